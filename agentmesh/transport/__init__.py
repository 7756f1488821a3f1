"""Links between agents: in one process (`InProcessLink`) or across hosts over MQTT (`MqttLink`)."""
from agentmesh.transport.link import ChannelStats, InProcessLink, Link, LinkMessage, edge_channel
from agentmesh.transport.mqtt import MqttConfig, MqttLink

__all__ = ["ChannelStats", "InProcessLink", "Link", "LinkMessage", "MqttConfig", "MqttLink", "edge_channel"]

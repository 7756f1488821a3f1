"""Links between agents: in one process (`InProcessLink`) or across hosts over MQTT (`MqttLink`)."""
from agentmesh.transport.link import (ChannelStats, InProcessLink, Link, LinkClosed, LinkMessage, LinkTimeout,
                                      edge_channel)
from agentmesh.transport.mqtt import MqttConfig, MqttLink

__all__ = ["ChannelStats", "InProcessLink", "Link", "LinkClosed", "LinkMessage", "LinkTimeout", "MqttConfig",
           "MqttLink", "edge_channel"]

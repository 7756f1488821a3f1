"""Links between agents: in one process (`InProcessLink`) or across hosts over MQTT (`MqttLink`)."""
from agentmesh.transport.link import (ChannelStats, InProcessLink, Link, LinkClosed, LinkMessage, LinkTimeout,
                                      edge_channel)
from agentmesh.transport.config import BrokerConfig, TLSConfig
from agentmesh.transport.mqtt import MqttLink

__all__ = ["BrokerConfig", "ChannelStats", "InProcessLink", "Link", "LinkClosed", "LinkMessage", "LinkTimeout", 
           "MqttLink", "TLSConfig", "edge_channel"]

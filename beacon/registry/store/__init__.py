"""Stores behind the cluster source: memory (one host) and etcd (many hosts)."""

from beacon.registry.store.base import Change, NodeNameTaken, NodeRecord, Store, StoreError
from beacon.registry.store.etcd import EtcdStore
from beacon.registry.store.gateway import GatewaySettings
from beacon.registry.store.memory import MemoryBackend, MemoryStore

__all__ = [
    "Change",
    "EtcdStore",
    "GatewaySettings",
    "MemoryBackend",
    "MemoryStore",
    "NodeNameTaken",
    "NodeRecord",
    "Store",
    "StoreError",
]

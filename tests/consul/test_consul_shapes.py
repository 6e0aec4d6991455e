"""Golden shapes: Beacon's Consul views compared field by field with the example responses in
Consul's own API documentation (hashicorp/consul, website/content/api-docs/*.mdx, quoted below
with the page and section each comes from). Only the enterprise-only `Namespace` is left out.
"""

from __future__ import annotations

import pytest

from beacon.api.consul.indexes import IndexTracker
from beacon.api.consul.views import (
    ViewContext,
    agent_health_view,
    agent_self_view,
    aggregated_status,
    catalog_node_view,
    catalog_nodes_view,
    catalog_service_view,
    catalog_services_view,
    checks_json,
    health_service_view,
)
from beacon.registry import Catalog, Snapshot, State
from beacon.registry.model import CheckSpec, CheckStatus
from tests.consul.consultest import compare_shape, container_endpoint, put

# website/content/api-docs/catalog.mdx, "List Services", Sample Response
CATALOG_SERVICES = {"consul": [], "redis": [], "postgresql": ["primary", "secondary"]}

# website/content/api-docs/catalog.mdx, "List Nodes for Service", Sample Response
CATALOG_SERVICE = [
    {
        "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
        "Node": "t2.320",
        "Address": "192.168.10.10",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "192.168.10.10", "wan": "10.0.10.10"},
        "NodeMeta": {"somekey": "somevalue"},
        "CreateIndex": 51,
        "ModifyIndex": 51,
        "ServiceAddress": "172.17.0.3",
        "ServiceEnableTagOverride": False,
        "ServiceID": "32a2a47f7992:nodea:5000",
        "ServiceName": "web",
        "ServicePort": 5000,
        "ServiceMeta": {"web_meta_value": "baz"},
        "ServiceTaggedAddresses": {
            "lan": {"address": "172.17.0.3", "port": 5000},
            "wan": {"address": "198.18.0.1", "port": 512},
        },
        "ServiceTags": ["prod"],
        "ServiceProxy": {
            "DestinationServiceName": "",
            "DestinationServiceID": "",
            "LocalServiceAddress": "",
            "LocalServicePort": 0,
            "Config": None,
            "Upstreams": None,
        },
        "ServiceConnect": {"Native": False, "Proxy": None},
        "Namespace": "default",
    }
]

# website/content/api-docs/catalog.mdx, "List Nodes", Sample Response (first entry)
CATALOG_NODES = [
    {
        "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
        "Node": "baz",
        "Address": "10.1.10.11",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.1.10.11", "wan": "10.1.10.11"},
        "Meta": {"instance_type": "t2.medium"},
    }
]

# website/content/api-docs/catalog.mdx, "Retrieve Map of Services for a Node", Sample Response
CATALOG_NODE = {
    "Node": {
        "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
        "Node": "t2-node",
        "Address": "10.1.10.12",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
        "Meta": {"instance_type": "t2.medium"},
    },
    "Services": {
        "redis": {
            "ID": "redis",
            "Service": "redis",
            "TaggedAddresses": {
                "lan": {"address": "10.1.10.12", "port": 8000},
                "wan": {"address": "198.18.1.2", "port": 80},
            },
            "Tags": ["v1"],
            "Meta": {"redis_version": "4.0"},
            "Port": 8000,
            "Namespace": "default",
        }
    },
}

# website/content/api-docs/health.mdx, "List Service Instances for Service", Sample Response
HEALTH_SERVICE = [
    {
        "Node": {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
            "Node": "foobar",
            "Address": "10.1.10.12",
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
            "Meta": {"instance_type": "t2.medium"},
        },
        "Service": {
            "ID": "redis",
            "Service": "redis",
            "Tags": ["primary"],
            "Address": "10.1.10.12",
            "TaggedAddresses": {
                "lan": {"address": "10.1.10.12", "port": 8000},
                "wan": {"address": "198.18.1.2", "port": 80},
            },
            "Meta": {"redis_version": "4.0"},
            "Port": 8000,
            "Weights": {"Passing": 10, "Warning": 1},
            "Namespace": "default",
        },
        "Checks": [
            {
                "Node": "foobar",
                "CheckID": "service:redis",
                "Name": "Service 'redis' check",
                "Status": "passing",
                "Notes": "",
                "Output": "",
                "ServiceID": "redis",
                "ServiceName": "redis",
                "ServiceTags": ["primary"],
                "Namespace": "default",
            },
            {
                "Node": "foobar",
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Namespace": "default",
            },
        ],
    }
]

# website/content/api-docs/agent/service.mdx, "Get local service health", By Name, JSON (web2 entry)
AGENT_HEALTH = [
    {
        "AggregatedStatus": "critical",
        "Service": {
            "ID": "web2",
            "Service": "web",
            "Tags": ["rails"],
            "Meta": {},
            "Port": 80,
            "Address": "",
            "SocketPath": "",
            "TaggedAddresses": {
                "lan": {"Address": "127.0.0.1", "Port": 8000},
                "wan": {"Address": "198.51.100.54", "Port": 80},
            },
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Namespace": "default",
            "Datacenter": "dc1",
        },
        "Checks": [
            {
                "Node": "server1",
                "CheckID": "service:web2",
                "Name": "Service 'web' check",
                "Status": "critical",
                "Notes": "",
                "Output": "Get \"http://localhost/health\": dial tcp [::1]:80: connect: connection refused",
                "ServiceID": "web2",
                "ServiceName": "web",
                "ServiceTags": ["rails"],
                "Type": "",
                "Namespace": "default",
                "Definition": {
                    "Interval": "0s",
                    "Timeout": "0s",
                    "DeregisterCriticalServiceAfter": "0s",
                    "HTTP": "",
                    "Header": None,
                    "Method": "",
                    "Body": "",
                    "TLSServerName": "",
                    "TLSSkipVerify": False,
                    "TCP": "",
                },
                "CreateIndex": 0,
                "ModifyIndex": 0,
            }
        ],
    }
]

# website/content/api-docs/agent/index.mdx, "Read Configuration", Sample Response
# (DebugConfig is "subject to change", so only its type is compared).
AGENT_SELF = {
    "Config": {
        "Datacenter": "dc1",
        "NodeName": "foobar",
        "NodeID": "9d754d17-d864-b1d3-e758-f3fe25a9874f",
        "Server": True,
        "Revision": "deadbeef",
        "Version": "1.0.0",
    },
    "DebugConfig": {},
    "Coord": {"Adjustment": 0, "Error": 1.5, "Vec": [0, 0, 0, 0, 0, 0, 0, 0]},
    "Member": {
        "Name": "foobar",
        "Addr": "10.1.10.12",
        "Port": 8301,
        "Tags": {"bootstrap": "1", "dc": "dc1"},
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 2,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 4,
        "DelegateCur": 4,
    },
    "Meta": {"instance_type": "i2.xlarge", "os_version": "ubuntu_16.04"},
}

ENTERPRISE = frozenset({"$.Namespace", "$.Service.Namespace", "$.Checks.Namespace", "$.Services.*.Namespace"})
# Fields real Consul answers carry that the samples above leave out; each is documented in the same
# page's Filtering table (selectors ServiceKind, ServiceWeights, Service.EnableTagOverride, ...) or
# in another example of the same object (CreateIndex/ModifyIndex, Type, Definition in the agent sample).
NODE_EXTRA = frozenset({"$.CreateIndex", "$.ModifyIndex"})


@pytest.fixture
def catalog() -> Catalog:
    catalog = Catalog()
    put(
        catalog,
        container_endpoint("aaa", "web", tags=("prod", "v1"), meta={"metrics_port": "9100"}),
        container_endpoint("bbb", "web", tags=("prod",), address="10.0.0.6", node="node-b", state=State.WARNING),
        container_endpoint("ccc", "redis", port=6379, state=State.DRAINING),
        container_endpoint(
            "ddd", "redis", port=6380, check=CheckSpec(kind="http", path="/health"),
            check_status=CheckStatus(State.CRITICAL, output="HTTP 500"), state=State.CRITICAL,
        ),
    )
    return catalog


@pytest.fixture
def snapshot(catalog: Catalog) -> Snapshot:
    return catalog.snapshot


@pytest.fixture
def ctx(catalog: Catalog) -> ViewContext:
    tracker = IndexTracker(catalog.snapshot, epoch=1_000_000, local_node="node-a")
    return ViewContext(tracker, "dc1", "192.0.2.10")


def test_catalog_services_matches_consuls_example(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = catalog_services_view(snapshot)
    assert ours == {"redis": [], "web": ["prod", "v1"]}
    assert compare_shape(ours, CATALOG_SERVICES, maps=frozenset({"$"})) == []


def test_catalog_service_matches_consuls_example(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = catalog_service_view(ctx, snapshot, "web")
    assert [e["ServiceID"] for e in ours] == ["aaa-80", "bbb-80"]
    problems = compare_shape(
        ours, CATALOG_SERVICE,
        maps=frozenset({"$.TaggedAddresses", "$.NodeMeta", "$.ServiceMeta", "$.ServiceTaggedAddresses"}),
        omitted=ENTERPRISE, extra=frozenset({"$.ServiceKind", "$.ServiceWeights"}),
    )
    assert problems == []
    first, second = ours
    assert (first["ServiceAddress"], first["ServicePort"], first["ServiceTags"]) == ("10.0.0.5", 80, ["prod", "v1"])
    assert first["ServiceMeta"] == {"metrics_port": "9100"}
    assert (first["Node"], first["Address"], first["Datacenter"]) == ("node-a", "192.0.2.10", "dc1")
    assert (second["Node"], second["Address"]) == ("node-b", "10.0.0.6")  # another node: its endpoint's address
    assert first["ModifyIndex"] >= first["CreateIndex"] > 1_000_000


def test_catalog_service_tag_filter_needs_every_tag(ctx: ViewContext, snapshot: Snapshot) -> None:
    assert [e["ServiceID"] for e in catalog_service_view(ctx, snapshot, "web", ("prod", "v1"))] == ["aaa-80"]
    assert catalog_service_view(ctx, snapshot, "web", ("nope",)) == []
    assert catalog_service_view(ctx, snapshot, "unknown") == []  # Consul: 200 and an empty list


def test_health_service_matches_consuls_example(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = health_service_view(ctx, snapshot, "web")
    problems = compare_shape(
        ours, HEALTH_SERVICE,
        maps=frozenset({"$.Node.TaggedAddresses", "$.Node.Meta", "$.Service.Meta", "$.Service.TaggedAddresses"}),
        omitted=ENTERPRISE,
        extra=frozenset({
            "$.Node.CreateIndex", "$.Node.ModifyIndex", "$.Service.EnableTagOverride", "$.Service.Datacenter",
            "$.Service.CreateIndex", "$.Service.ModifyIndex", "$.Checks.Type", "$.Checks.Definition",
            "$.Checks.CreateIndex", "$.Checks.ModifyIndex",
        }),
    )
    assert problems == []
    statuses = {e["Service"]["ID"]: [c["Status"] for c in e["Checks"]] for e in ours}
    assert statuses == {"aaa-80": ["passing", "passing"], "bbb-80": ["passing", "warning"]}
    assert ours[0]["Checks"][0]["CheckID"] == "serfHealth"


def test_health_passing_keeps_only_instances_whose_checks_all_pass(ctx: ViewContext, snapshot: Snapshot) -> None:
    assert [e["Service"]["ID"] for e in health_service_view(ctx, snapshot, "web", passing=True)] == ["aaa-80"]
    # Draining and critical redis instances are both left out.
    assert health_service_view(ctx, snapshot, "redis", passing=True) == []


def test_draining_is_consuls_service_maintenance(ctx: ViewContext, snapshot: Snapshot) -> None:
    entry = next(e for e in health_service_view(ctx, snapshot, "redis") if e["Service"]["ID"] == "ccc-6379")
    by_id = {c["CheckID"]: c for c in entry["Checks"]}
    assert by_id["service:ccc-6379"]["Status"] == "passing"  # the backend itself was healthy
    maintenance = by_id["_service_maintenance:ccc-6379"]
    assert (maintenance["Status"], maintenance["Name"]) == ("critical", "Service Maintenance Mode")
    assert aggregated_status(entry["Checks"]) == "maintenance"  # what Prometheus's Consul SD reports


def test_check_output_and_kind_come_from_beacons_check(ctx: ViewContext, snapshot: Snapshot) -> None:
    ep = snapshot.endpoints["ddd-6380"]
    service_check = checks_json(ctx, ep)[1]
    assert (service_check["Status"], service_check["Output"], service_check["Type"]) == ("critical", "HTTP 500", "http")


def test_catalog_nodes_lists_every_node_seen(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = catalog_nodes_view(ctx, snapshot)
    assert [n["Node"] for n in ours] == ["node-a", "node-b"]
    problems = compare_shape(ours, CATALOG_NODES, maps=frozenset({"$.TaggedAddresses", "$.Meta"}), extra=NODE_EXTRA)
    assert problems == []
    assert ours[0]["ID"] != ours[1]["ID"] and len(ours[0]["ID"]) == 36


def test_catalog_node_matches_consuls_example(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = catalog_node_view(ctx, snapshot, "node-b")
    assert ours is not None
    problems = compare_shape(
        ours, CATALOG_NODE,
        maps=frozenset({"$.Node.TaggedAddresses", "$.Node.Meta", "$.Services", "$.Services.*.TaggedAddresses",
                        "$.Services.*.Meta"}),
        omitted=ENTERPRISE,
        extra=frozenset({"$.Node.CreateIndex", "$.Node.ModifyIndex", "$.Services.*.Address", "$.Services.*.Weights",
                         "$.Services.*.EnableTagOverride", "$.Services.*.CreateIndex", "$.Services.*.ModifyIndex"}),
    )
    assert problems == []
    assert list(ours["Services"]) == ["bbb-80"]
    assert catalog_node_view(ctx, snapshot, "no-such-node") is None  # Consul answers null


def test_agent_health_codes_follow_consul(ctx: ViewContext, snapshot: Snapshot) -> None:
    code, status, entries = agent_health_view(ctx, snapshot, "web")
    # Only this node's (node-a) instance counts: the agent endpoint is local, as in Consul.
    assert (code, status, [e["Service"]["ID"] for e in entries]) == (200, "passing", ["aaa-80"])
    problems = compare_shape(
        entries, AGENT_HEALTH,
        maps=frozenset({"$.Service.Meta", "$.Service.TaggedAddresses"}),
        omitted=ENTERPRISE | {"$.Service.SocketPath"},
        extra=frozenset({"$.Service.CreateIndex", "$.Service.ModifyIndex"}),
    )
    # Beacon's checks carry no Consul check definition (its checks are Beacon's own): an empty object.
    assert [p for p in problems if ".Definition." not in p] == []
    code, status, _ = agent_health_view(ctx, snapshot, "redis")
    assert (code, status) == (503, "critical")
    assert agent_health_view(ctx, snapshot, "nothing")[0] == 404


def test_agent_self_matches_consuls_example(ctx: ViewContext, snapshot: Snapshot) -> None:
    ours = agent_self_view(ctx, api_address="127.0.0.1:8700")
    problems = compare_shape(
        ours, AGENT_SELF, maps=frozenset({"$.Member.Tags", "$.Meta", "$.DebugConfig"}),
        extra=frozenset({"$.Config.PrimaryDatacenter", "$.Coord.Height"}),
    )
    assert problems == []
    assert ours["Config"]["Datacenter"] == "dc1"  # what Prometheus's Consul SD reads on start-up
    assert ours["Config"]["NodeName"] == "node-a"


def test_the_comparison_catches_renamed_retyped_and_unknown_fields() -> None:
    reference = {"ServiceName": "web", "ServicePort": 80, "ServiceMeta": {"k": "v"}}
    meta = frozenset({"$.ServiceMeta"})
    assert compare_shape({"ServiceName": "web", "ServicePort": 80, "ServiceMeta": {}}, reference, maps=meta) == []
    assert compare_shape({"Servicename": "web", "ServicePort": 80, "ServiceMeta": {}}, reference, maps=meta) == [
        "$.ServiceName: missing", "$.Servicename: not in Consul's example"]
    assert compare_shape({"ServiceName": "web", "ServicePort": "80", "ServiceMeta": {}}, reference, maps=meta) == [
        "$.ServicePort: expected number, got string"]
    assert compare_shape({"ServiceName": "web", "ServicePort": 80, "ServiceMeta": {"k": 1}}, reference,
                         maps=meta) == ["$.ServiceMeta.*: expected string, got number"]
    # Without `maps`, an object's keys are field names and must match.
    assert compare_shape({"ServiceName": "web", "ServicePort": 80, "ServiceMeta": {}}, reference) == [
        "$.ServiceMeta.k: missing"]

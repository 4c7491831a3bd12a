"""A two-node Ray cluster on this machine for the tests, as Ray's own tests make one
(ray.cluster_utils.Cluster): a head and a worker node of one CPU each, every address on 127.0.0.1.

Prints `address HOST:PORT` once both nodes are up, then reads commands on stdin: `remove-worker` stops
the worker node's processes (a node lost mid-build) and prints `removed`; end of input shuts the
cluster down. Run it with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment of this process and of
every driver: Ray then takes 127.0.0.1 as the node address instead of the machine's network address.
"""

import sys

from ray.cluster_utils import Cluster

temp_dir = sys.argv[1]  # short: Ray's socket paths live under it
node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False, "temp_dir": temp_dir})
worker = cluster.add_node(**node)
cluster.wait_for_nodes()
print("address", cluster.address, flush=True)
try:
    for command in sys.stdin:
        if command.strip() == "remove-worker":
            cluster.remove_node(worker)
            print("removed", flush=True)
finally:
    cluster.shutdown()

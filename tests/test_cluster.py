"""The cluster-fit check (issue 14): sinfo parsing and misfit messages, on sinfo lines as SLURM prints them."""

from __future__ import annotations

from phenoprofiler_core.cluster import Node, Request, gpus_in_gres, misfits, parse_sinfo

# sinfo -h -N -o '%N|%P|%c|%m|%G' on a cluster with a default CPU partition and a GPU partition
SINFO = """\
cpu01|cpu*|32|192000|(null)
cpu02|cpu*|64|384000|(null)
gpu01|gpu|16|128000|gpu:a100:4(S:0-1)
gpu02|gpu|16|128000|gpu:2,shard:8
"""


def test_parse_sinfo_reads_partitions_sizes_and_gpus():
    nodes = parse_sinfo(SINFO)
    assert [n.name for n in nodes] == ["cpu01", "cpu02", "gpu01", "gpu02"]
    assert [(n.partition, n.default) for n in nodes] == [
        ("cpu", True),
        ("cpu", True),
        ("gpu", False),
        ("gpu", False),
    ]
    assert [(n.cpus, n.memory_mb, n.gpus) for n in nodes] == [
        (32, 192000, 0),
        (64, 384000, 0),
        (16, 128000, 4),
        (16, 128000, 2),
    ]


def test_gpus_in_gres_forms():
    assert gpus_in_gres("(null)") == 0
    assert gpus_in_gres("gpu:1") == 1
    assert gpus_in_gres("gpu:a100:4(S:0-1)") == 4
    assert gpus_in_gres("gpu:v100:2,gpu:a100:2") == 4
    assert gpus_in_gres("shard:8") == 0
    assert gpus_in_gres("gpu") == 1


def test_ranges_marked_with_plus_use_the_lower_bound():
    (node,) = parse_sinfo("n1|debug*|2+|16000+|(null)\n")
    assert (node.cpus, node.memory_mb) == (2, 16000)


def test_requests_that_fit_give_no_message():
    nodes = parse_sinfo(SINFO)
    ok = [
        Request("classic", cpus=64, memory_mb=384000),  # the largest default-partition node, exactly
        Request("train", cpus=16, memory_mb=64000, gpus=4, partition="gpu"),
    ]
    assert misfits(ok, nodes) == []


def test_misfits_name_rule_request_and_largest_node():
    nodes = parse_sinfo(SINFO)
    problems = misfits(
        [
            Request("classic", cpus=65, memory_mb=1000),  # one CPU more than any cpu node
            Request("embed", cpus=4, memory_mb=8000, gpus=1),  # a GPU in the CPU-only default partition
            Request("train", cpus=8, memory_mb=8000, gpus=8, partition="gpu"),  # more GPUs than a node has
            Request("report", cpus=1, memory_mb=1000, partition="bigmem"),  # no such partition
        ],
        nodes,
    )
    assert len(problems) == 4
    assert problems[0] == (
        "rule 'classic' asks for 65 CPUs, 1000 MB and 0 GPUs, but no node of the default partition 'cpu' has "
        "that: the largest has 64 CPUs, 384000 MB and 0 GPUs"
    )
    assert "rule 'embed'" in problems[1] and "1 GPUs" in problems[1] and "0 GPUs" in problems[1]
    assert "rule 'train'" in problems[2] and "partition 'gpu'" in problems[2] and "4 GPUs" in problems[2]
    assert "partition 'bigmem'" in problems[3]


def test_memory_alone_can_misfit():
    nodes = [Node("vm", "debug", True, 2, 19284, 0)]
    (problem,) = misfits([Request("train", cpus=2, memory_mb=32000)], nodes)
    assert "32000 MB" in problem and "19284 MB" in problem

"""What a SLURM cluster offers, and whether the workflow's jobs fit it.

SLURM accepts a job that no node can ever run (more CPUs or memory than any node of its partition has)
and leaves it pending forever (reason ``PartitionConfig``), while Snakemake waits without a word.  So
before the first submission the workflow compares every rule's request with the nodes ``sinfo`` reports
and stops with one line per misfit, naming the rule, what it asks and the largest node on offer.

``sinfo -h -N -o '%N|%P|%c|%m|%G'`` gives one line per node and partition: node name, partition (the
default one marked ``*``), CPUs, memory in MB and generic resources (``gpu:a100:4(S:0-1)``, ``(null)``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

SINFO_FORMAT = "%N|%P|%c|%m|%G"


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # the partition a job without --partition goes to
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Request:
    """What one rule's jobs ask of SLURM (the largest job of the rule)."""

    rule: str
    cpus: int
    memory_mb: int
    gpus: int = 0
    partition: str | None = None


def _number(text: str) -> int:
    """'19284' / '2+' / '16000+' → the leading integer (sinfo marks ranges of node sizes with '+')."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else 0


def gpus_in_gres(gres: str) -> int:
    """GPU count in a GRES string: 'gpu:a100:4(S:0-1),shard:8' → 4; 'gpu:2' → 2; '(null)' → 0."""
    total = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item.strip())
        fields = item.split(":")
        if fields[0] != "gpu":
            continue
        count = fields[-1] if len(fields) > 1 else "1"
        total += int(count) if count.isdigit() else 1
    return total


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from the output of ``sinfo -h -N -o '%N|%P|%c|%m|%G'``."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 5:
            raise ValueError(f"unexpected sinfo line {line!r} (format {SINFO_FORMAT})")
        name, partition, cpus, memory, gres = (f.strip() for f in fields[:5])
        nodes.append(
            Node(
                name=name,
                partition=partition.rstrip("*"),
                default=partition.endswith("*"),
                cpus=_number(cpus),
                memory_mb=_number(memory),
                gpus=gpus_in_gres(gres),
            )
        )
    return nodes


def query_nodes(sinfo: str = "sinfo") -> list[Node] | None:
    """The cluster's nodes, or None when ``sinfo`` is not available or fails (not on a SLURM cluster)."""
    if shutil.which(sinfo) is None:
        return None
    try:
        out = subprocess.run(
            [sinfo, "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sinfo(out.stdout)


def cluster_gpus(nodes: Iterable[Node]) -> int:
    """Most GPUs on any node (0: a CPU-only cluster)."""
    return max((n.gpus for n in nodes), default=0)


def misfits(requests: Iterable[Request], nodes: list[Node]) -> list[str]:
    """One line per request that no node of its partition can run; [] when everything fits."""
    problems = []
    for request in requests:
        if request.partition:
            pool = [n for n in nodes if n.partition == request.partition]
            where = f"partition '{request.partition}'"
        else:
            pool = [n for n in nodes if n.default] or nodes
            where = f"the default partition '{pool[0].partition}'" if pool else "the cluster"
        if not pool:
            problems.append(
                f"rule '{request.rule}' asks for partition '{request.partition}', which sinfo does not list"
            )
            continue
        if any(
            n.cpus >= request.cpus and n.memory_mb >= request.memory_mb and n.gpus >= request.gpus
            for n in pool
        ):
            continue
        largest = max(pool, key=lambda n: (n.cpus, n.memory_mb, n.gpus))
        problems.append(
            f"rule '{request.rule}' asks for {request.cpus} CPUs, {request.memory_mb} MB and {request.gpus} GPUs, "
            f"but no node of {where} has that: the largest has {largest.cpus} CPUs, {largest.memory_mb} MB and "
            f"{largest.gpus} GPUs"
        )
    return problems


def requests_of_jobs(jobs: Iterable, resources: dict | None = None) -> list[Request]:
    """The largest request of each rule among Snakemake jobs (``job.rule.name``, ``job.threads``,
    ``job.resources``), plus, for rules with no job planned yet (they wait for a checkpoint), what the
    config's ``resources`` section asks for them."""
    largest: dict[str, Request] = {}
    for job in jobs:
        name = job.rule.name
        res = job.resources
        gpus = res.get("gpu", 0) or 0
        if not gpus and res.get("gres"):
            gpus = gpus_in_gres(str(res.get("gres")))
        request = Request(
            rule=name,
            cpus=int(job.threads),
            memory_mb=int(res.get("mem_mb", 0) or 0),
            gpus=int(gpus) if str(gpus).isdigit() else 0,
            partition=res.get("slurm_partition") or None,
        )
        old = largest.get(name)
        if old is None or (request.cpus, request.memory_mb, request.gpus) > (
            old.cpus,
            old.memory_mb,
            old.gpus,
        ):
            largest[name] = request
    for name, wanted in (resources or {}).items():
        if name not in largest and isinstance(wanted, dict):
            largest[name] = Request(rule=name, cpus=int(wanted["threads"]), memory_mb=int(wanted["mem_mb"]))
    return list(largest.values())

"""Runtimes report memory as PSS, falling back to RSS only where a job has no PSS (issue 13.6)."""

from __future__ import annotations

import re

from test_report import sections

from phenoprofiler_core import report

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_memory_is_pss_and_rss_is_marked_where_pss_is_missing(tmp_path):
    bench = tmp_path / "benchmarks"
    (bench / "train").mkdir(parents=True)
    (bench / "tiles").mkdir()
    # train: 4 forked workers share their pages; RSS counts them 4 times, PSS once.
    (bench / "train" / "train.tsv").write_text(
        HEADER + "100.0\t0:01:40\t34000.0\t40000\t7000\t8500.5\t1\t2\t90\t380\n"
    )
    (bench / "tiles" / "P1.tsv").write_text(HEADER + "10.0\t0:00:10\t900.0\t1000\t600\t650.0\t1\t2\t90\t9\n")
    (bench / "tiles" / "P2.tsv").write_text(HEADER + "12.0\t0:00:12\t950.0\t1000\t600\t-\t1\t2\t90\t11\n")
    body = sections(report.build_report(tmp_path, sets=[]))["runtimes"]
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", body).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header)[-1] == "peak memory, PSS (MB)"
    rows = dict(re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", body))
    assert re.findall(r">([^<]*)</td>", rows["train"])[-1] == "8,500.5"  # PSS, not the 34,000 RSS
    # tiles: P2 has no PSS ("-"), so its RSS (950) is the rule's peak and is marked as RSS
    last = re.findall(r"<td([^>]*)>([^<]*)</td>", rows["tiles"])[-1]
    assert last[1] == "950.0 (RSS)" and "1 job(s) had no max_pss" in last[0]
    assert "<code>max_pss</code>" in body

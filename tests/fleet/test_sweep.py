"""`collect sweep` and `collect stack` on a real dask.distributed local cluster (two worker
processes, shared by the module): exact rows from made-up machines, the errors table against
`collect analyze`'s own lines, resuming, a worker killed mid-sweep, and the column types as
pyarrow and DuckDB read them."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster

import collector
from collector.cli import main
from collector.fleet.sweep import Progress, terminal
from tests.fleet.fleet_images import MODULES, PROCESSES, build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """Two worker processes, one thread each, as `collect sweep --workers 2` starts them."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three hosts (web-2 runs one more process, web-3 loads one more module), an image cut
    inside its header and a note a directory sweep passes over; beside them, a file that is
    no image and an image cut inside its RAM (before the pages the analyses read)."""
    where = tmp_path_factory.mktemp("fleet")
    images = where / "images"
    images.mkdir()
    machines = [
        build(images / "web-1.lime.zst", "web-1", 1),
        build(images / "web-2.lime.zst", "web-2", 2, processes=[*PROCESSES, (4242, "xmrig")]),
        build(images / "web-3.lime.zst", "web-3", 3, modules=[*MODULES, "diamorphine"]),
    ]
    cut = images / "cut.lime.zst"
    cut.write_bytes(machines[0].path.read_bytes()[:100])
    (images / "notes.txt").write_text("captured by hand\n")
    junk = where / "junk.lime.zst"
    junk.write_bytes(b"this is no image\n" * 8)
    cut_ram = where / "cut-ram.lime.zst"
    whole = machines[0].path.read_bytes()
    cut_ram.write_bytes(whole[: len(whole) * 6 // 10])
    return {"dir": images, "machines": machines, "cut": cut, "junk": junk, "cut_ram": cut_ram}


def sweep(capsys: pytest.CaptureFixture, client: Client, *args: str) -> tuple[int, dict]:
    code = main(["sweep", *args, "--scheduler", client.scheduler.address, "--json"])
    return code, json.loads(capsys.readouterr().out)


def dataset(outdir: Path, analysis: str) -> list[dict[str, Any]]:
    table = pa.concat_tables(
        pq.read_table(p) for p in sorted((outdir / analysis).glob("*.parquet"))
    )
    return sorted(table.to_pylist(), key=lambda r: (r["image"], str(r.get("pid") or r.get("name"))))


def analyze_line(capsys: pytest.CaptureFixture, image: Path, analysis: str) -> tuple[int, str]:
    """What `collect analyze` ends with on an image: its exit status and its one line."""
    code = main(["analyze", str(image), analysis])
    err = capsys.readouterr().err.strip()
    assert err.startswith("collect: ") and "\n" not in err
    return code, err.removeprefix("collect: ")


def test_sweep_gives_every_row_and_names_the_bad_images(
    fleet: dict, client: Client, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, summary = sweep(
        capsys, client, str(fleet["dir"]), str(fleet["junk"]), str(fleet["cut_ram"]),
        "--analysis", "pslist,lsmod", "-o", str(out),
    )  # fmt: skip
    assert code == 1  # some pairs failed
    assert (summary["images"], summary["tasks"], summary["workers"]) == (6, 12, 2)
    # The image cut in its RAM is written (with the rows before the failure: none here).
    assert (summary["written"], summary["skipped"], summary["failed"]) == (8, 0, 4)
    machines = fleet["machines"]
    for analysis in ("pslist", "lsmod"):
        want = [r for m in machines for r in m.rows(analysis)]
        want.sort(key=lambda r: (r["image"], str(r.get("pid") or r.get("name"))))
        assert dataset(out, analysis) == want
    assert summary["records"] == sum(len(m.pslist) + len(m.lsmod) for m in machines)

    errors = sorted(
        pq.read_table(out / "errors").to_pylist(), key=lambda r: (r["image"], r["analysis"])
    )
    want_errors = []
    for bad, kind in (
        (fleet["cut"], "truncated"),
        (fleet["junk"], "not a memory image"),
        (fleet["cut_ram"], "stopped early"),
    ):
        for analysis, plugin in (("lsmod", "modules"), ("pslist", "tasks")):
            exit_code, line = analyze_line(capsys, bad, analysis)
            want_errors.append(
                {"image": str(bad), "analysis": analysis, "kind": kind, "exit_code": exit_code,
                 "error": line, "plugin": plugin, "plugin_version": collector.__version__}
            )  # fmt: skip
    assert [e["exit_code"] for e in want_errors] == [3, 3, 6, 6, 1, 1]
    assert all("stopped after 0 records" in e["error"] for e in want_errors[4:])
    assert errors == sorted(want_errors, key=lambda r: (r["image"], r["analysis"]))
    assert not list(out.rglob("*.tmp-*"))


def test_stack_ranks_the_odd_process_and_module_first(
    fleet: dict, client: Client, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    sweep(capsys, client, str(fleet["dir"]), "--analysis", "pslist,lsmod", "-o", str(out))
    assert main(["stack", str(out), "pslist", "comm", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    everywhere = "web-1,web-2,web-3"
    assert rows == [
        {"comm": "xmrig", "hosts": 1, "host_names": "web-2"},
        *(
            {"comm": c, "hosts": 3, "host_names": everywhere}
            for c in sorted(c for _, c in PROCESSES)
        ),
    ]
    assert main(["stack", str(out), "lsmod", "name", "--max-hosts", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "diamorphine", "hosts": 1, "host_names": "web-3"}
    ]
    # Two fields: a value is the pair.
    assert (
        main(["stack", str(out), "pslist", "pid,comm", "--max-hosts", "2", "--format", "csv"]) == 0
    )
    assert capsys.readouterr().out == "pid,comm,hosts,host_names\n4242,xmrig,1,web-2\n"
    assert main(["stack", str(out), "pslist", "cmdline"]) == 2
    assert "pslist has no field 'cmdline'" in capsys.readouterr().err


def test_rerun_skips_what_is_done_and_force_redoes_it(
    fleet: dict, client: Client, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    images = tmp_path / "images"
    shutil.copytree(fleet["dir"], images)
    args = (str(images), "--analysis", "pslist,lsmod", "-o", str(out))
    assert sweep(capsys, client, *args)[1]["written"] == 6
    files = {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")}
    code, again = sweep(capsys, client, *args)
    # The cut image is tried again (it may have been copied whole since); the rest is skipped.
    assert (again["written"], again["skipped"], again["failed"], again["records"]) == (0, 6, 2, 23)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")} == files
    # A host captured again at the same path: only its pairs are redone.
    machine = build(images / "web-1.lime.zst", "web-1", 9, processes=PROCESSES[:2])
    code, third = sweep(capsys, client, *args)
    assert (third["written"], third["skipped"]) == (2, 4)
    pslist = [r for r in dataset(out, "pslist") if r["hostname"] == "web-1"]
    assert pslist == machine.rows("pslist")
    code, forced = sweep(capsys, client, *args, "--force")
    assert (forced["written"], forced["skipped"]) == (6, 0)
    # An image repaired: its error goes, its rows come.
    shutil.copy(images / "web-3.lime.zst", images / "cut.lime.zst")
    code, repaired = sweep(capsys, client, *args)
    assert (code, repaired["written"], repaired["failed"]) == (0, 2, 0)
    assert not list((out / "errors").rglob("*.parquet"))


def test_columns_have_the_declared_types_in_pyarrow_and_duckdb(
    fleet: dict, client: Client, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    sweep(
        capsys, client, str(fleet["machines"][2].path), "--analysis", "lsmod,pslist", "-o", str(out)
    )
    # Declared field types (collector/plugins/modules.py, tasks.py): str, int, hex, bool.
    arrow = {"str": pa.string(), "int": pa.int64(), "hex": pa.uint64(), "bool": pa.bool_()}
    sql = {"str": "VARCHAR", "int": "BIGINT", "hex": "UBIGINT", "bool": "BOOLEAN"}
    declared = {
        "lsmod": {"name": "str", "address": "hex", "size": "int", "core_size": "int",
                  "init_size": "int", "state": "str", "refcount": "int", "users": "str",
                  "taints": "str", "parameters": "str", "module": "hex", "proc_modules": "str",
                  "notes": "str"},
        "pslist": {"pid": "int", "tgid": "int", "ppid": "int", "comm": "str", "uid": "int",
                   "gid": "int", "euid": "int", "state": "str", "flags": "hex",
                   "start_time": "int", "started": "str", "kthread": "bool", "address": "hex",
                   "note": "str"},
    }  # fmt: skip
    provenance = {"image": "VARCHAR", "image_sha256": "VARCHAR", "hostname": "VARCHAR",
                  "kernel_release": "VARCHAR", "boot_id": "VARCHAR",
                  "captured_at": "TIMESTAMP WITH TIME ZONE", "plugin": "VARCHAR",
                  "plugin_version": "VARCHAR"}  # fmt: skip
    con = duckdb.connect()
    for analysis, fields in declared.items():
        (path,) = (out / analysis).glob("*.parquet")
        schema = pq.read_schema(path)
        assert schema.names == [*fields, *provenance]
        assert [schema.field(n).type for n in fields] == [arrow[t] for t in fields.values()]
        assert schema.field("captured_at").type == pa.timestamp("us", tz="UTC")
        described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()
        assert {r[0]: r[1] for r in described} == {
            **{n: sql[t] for n, t in fields.items()},
            **provenance,
        }
    # Addresses above 2**63 come back whole, and compare as addresses.
    (address,) = con.execute(
        f"SELECT address FROM read_parquet('{out}/lsmod/*.parquet') WHERE name = 'diamorphine'"
    ).fetchone()
    assert address == 0xFFFFFFFFC0300000


def test_a_worker_killed_mid_sweep_loses_nothing_and_duplicates_nothing(
    fleet: dict, client: Client, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    machines = [build(images / f"host-{n:02d}.lime.zst", f"host-{n:02d}", n) for n in range(40)]
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "collector", "sweep", str(images), "--analysis", "pslist,lsmod",
        "-o", str(out), "--scheduler", client.scheduler.address, "--json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pids = client.run(os.getpid)
    running = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/*.parquet"))) < 10:
        assert running.poll() is None, "the sweep ended before a worker could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    busy = [addr for addr, keys in client.processing().items() if keys]
    victim = pids[busy[0]]
    os.kill(victim, signal.SIGKILL)
    first = json.loads(running.communicate(timeout=300)[0])
    assert first["tasks"] == 80
    # Run again: whatever the first run lost is done now, nothing twice.
    again = json.loads(
        subprocess.run(command, env=env, capture_output=True, text=True, check=False).stdout
    )
    assert again["failed"] == 0
    assert again["written"] + again["skipped"] == 80
    # Tasks whose results died with the worker were run again elsewhere (and found their
    # file already there): every pair is accounted for once.
    assert first["written"] + first["skipped"] + first["failed"] == 80
    for analysis in ("pslist", "lsmod"):
        rows = dataset(out, analysis)
        want = sorted(
            (r for m in machines for r in m.rows(analysis)),
            key=lambda r: (r["image"], str(r.get("pid") or r.get("name"))),
        )
        assert rows == want  # complete, and no row twice
    assert not list(out.rglob("*.tmp-*"))
    assert victim not in client.run(os.getpid).values()  # the nanny started a new process


def test_without_the_fleet_extra_it_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb now raises ImportError
    assert main(["sweep", str(tmp_path), "--analysis", "pslist", "-o", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (
        "collect: collect sweep needs duckdb: pip install 'collector[fleet]'\n"
    )


def test_capture_and_analysis_commands_import_none_of_the_extra() -> None:
    code = (
        "import sys; from collector.cli import command_parser; command_parser();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'pyarrow', 'duckdb'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"


def test_the_progress_line_counts_done_failed_rate_and_time_left() -> None:
    screen = io.StringIO()
    progress = Progress(8, screen, time.monotonic() - 60)  # a minute in, nothing done yet
    progress.last = 0.0
    progress.update(2, 1)  # 2 tasks a minute: 6 left, 3 minutes
    progress.close()
    lines = screen.getvalue().split("\r")
    assert lines[1] == "sweep [........................] 0/8 tasks, 0 failed, 0.0/min, ETA --:-- "
    assert lines[2] == "sweep [######..................] 2/8 tasks, 1 failed, 2.0/min, ETA 03:00 \n"
    assert terminal(screen) is None  # not a terminal: no progress line at all


def test_workers_and_a_scheduler_do_not_go_together(capsys: pytest.CaptureFixture) -> None:
    argv = ["sweep", ".", "--analysis", "pslist", "-o", "o", "--workers", "2"]
    assert main([*argv, "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert capsys.readouterr().err == (
        "collect: sweep: --workers sizes the local cluster; a --scheduler has its own\n"
    )

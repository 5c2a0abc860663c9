"""``jobspine bench`` given bad or odd input from the command line: a one-line usage error
(status 2) before anything starts, never a traceback after minutes of running; Ctrl-C stops
it at once, quietly, with nothing left running."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).parent.parent


def refused(*argv: str) -> str:
    """``jobspine bench argv``'s usage error, parsed only (nothing is started): status 2 and
    one line naming the option and the value."""
    from bench.run import parse_args

    err = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(err):
        parse_args(list(argv))
    assert exited.value.code == 2
    error = err.getvalue().splitlines()[-1]
    assert error.startswith("jobspine bench: error: argument "), err.getvalue()
    return error


def float_options() -> list[str]:
    """The bench's options that take a float (seconds, rates, milliseconds of CPU)."""
    from bench.run import parser

    return [
        a.option_strings[0] for a in parser()._actions if getattr(a.type, "__name__", "") == "float"
    ]


@pytest.mark.parametrize("option", float_options())
def test_an_infinite_amount_is_a_usage_error(option: str) -> None:
    """``--rate inf`` passed and ended the fanout in ``OverflowError`` (int(inf)) once its
    server was up; ``--idle-window inf`` would measure for ever."""
    assert f"argument {option}: must be a finite number, got 'inf'" in refused(option, "inf")


@pytest.mark.parametrize(
    "option",
    ["--jobs", "--running", "--idle-jobs", "--queue-capacity", "--queue-jobs", "--multinode-jobs"],
)
def test_a_count_past_the_runtimes_bound_is_a_usage_error(option: str) -> None:
    """Each of these becomes the server's ``max_running`` (or ``max_waiting_per_user``): past
    2**31 - 1, the server refused its config file and the bench ended in an AssertionError
    carrying the server's log."""
    error = refused(option, str(2**31))
    assert f"argument {option}: must be 2147483647 or less, got '2147483648'" in error


def test_a_lease_renewed_no_sooner_than_it_lapses_is_a_usage_error() -> None:
    """The nodes refuse it: multinode ended in RuntimeError (node n0 exited at start)."""
    error = refused("--lease-ttl", "1", "--lease-renew-interval", "2")
    assert "argument --lease-renew-interval: must be less than --lease-ttl (1), got 2" in error


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:abc", "redis://127.0.0.1:99999", "redis://[::1", "notaurl", "",
     "http://127.0.0.1:6379", "redis://127.0.0.1:6379/x"],
)  # fmt: skip
def test_a_redis_url_that_is_not_one_is_a_usage_error(url: str) -> None:
    """A bad port or IPv6 host ended the peers' run in ValueError (the PING check's
    urlsplit); one without ``redis://`` passed that check and ended in CalledProcessError
    (the peer's own client refused it)."""
    assert f"argument --redis: expected a redis://HOST:PORT/DB URL, got {url!r}" in refused(
        "--redis", url
    )


def test_a_redis_url_is_taken_with_its_database_and_shown_without_its_password() -> None:
    from bench.run import parse_args

    for url in ("redis://127.0.0.1:6379/13", "redis://:pw@localhost:6380/", "redis://"):
        assert parse_args(["--redis", url]).redis == url
    assert "'redis://u:***@h:abc'" in refused("--redis", "redis://u:secret@h:abc")


def test_a_json_file_that_cannot_be_written_is_a_usage_error(tmp_path: Path) -> None:
    """The figures were written after the whole run (half an hour for all): a directory, a
    path under a file or where nothing can be created ended it in a traceback then, the JSON
    lost. Nothing is left where it was tried."""
    (tmp_path / "file").write_text("")
    for path, reason in [
        (tmp_path, "Is a directory"),
        (tmp_path / "file" / "out.json", "Not a directory"),
        (Path("/proc/h2-bench.json"), "No such file or directory"),  # nothing can be made
    ]:
        error = refused("--json", str(path))
        assert f"argument --json: cannot write {str(path)!r}: {reason}" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == ""


def test_a_json_file_in_new_directories_or_replaced_is_fine(tmp_path: Path) -> None:
    from bench.run import parse_args

    (tmp_path / "old.json").write_text("old")
    assert parse_args(["--json", str(tmp_path / "old.json")]).json == str(tmp_path / "old.json")
    assert (tmp_path / "old.json").read_text() == "old"  # untouched until the run is over
    new = tmp_path / "a" / "b" / "new.json"
    assert parse_args(["--json", str(new)]).json == str(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_figures_that_cannot_be_written_after_the_run_are_said_so_in_a_line(
    tmp_path: Path,
) -> None:
    """A full disk (``/dev/full``) ended the run in a traceback after its table."""
    result = bench("--scenario", "saq", "--redis", "redis://127.0.0.1:1", "--json", "/dev/full")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(
        "figures not written to /dev/full: No space left on device (the table has them)\n"
    )
    assert "cores (" in result.stdout  # the table, printed before


def children(pid: int) -> set[int]:
    """Every process descending from ``pid``."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = {int(p) for p in task.read_text().split()}
            except OSError:
                continue
            todo += kids - found
            found |= kids
    return found


@pytest.mark.parametrize("group", [False, True], ids=["process", "process group"])
def test_ctrl_c_stops_the_bench_at_once_quietly_leaving_nothing(
    tmp_path: Path, group: bool
) -> None:
    """Ctrl-C (SIGINT to the bench, or to its process group as a terminal sends it) during a
    fanout: status 130 and 'interrupted', as every jobspine command (it ended in an
    exception group's traceback, status 1, and the subscriber process's own traceback; sent
    to the bench alone, it waited 10 s for the subscribers); its processes and its temporary
    directory are gone."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = ["--scenario", "fanout", "--peers", "--jobs", "20", "--running", "10"]
    argv += ["--updates", "1000", "--interval", "0.01", "--json", str(tmp_path / "out.json")]
    process = subprocess.Popen(
        [sys.executable, "-m", "transport._cli", "bench", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # SIGINT as a terminal's shell leaves it (a background job's is ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        while "connections" not in (line := process.stderr.readline()):  # under way
            assert line, process.communicate()
        started = children(process.pid)
        assert started
        sent = time.monotonic()
        if group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.rstrip().endswith("interrupted"), err
    assert "figures written" not in out
    assert took < 5, took
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert list(tmp_path.iterdir()) == []  # no workdir left, no JSON


def bench(*argv: str) -> subprocess.CompletedProcess[str]:
    """``jobspine bench argv``, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "transport._cli", "bench", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_peer_whose_redis_refuses_the_url_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """A Redis that answers PING but has no such database (or takes no such password) passed
    the check before the peers, and each ended the run in CalledProcessError."""
    url = "redis://127.0.0.1:6379/99"
    argv = ["--scenario", "saq", "arq", "--peer-jobs", "5", "--updates", "2", "--redis", url]
    result = bench(*argv, "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for peer in ("saq", "arq"):
        assert (
            f"[{peer}] skipped: the Redis at {url} refuses it: ResponseError: DB index is out"
            " of range (--redis)\n" in result.stderr
        )


@contextlib.contextmanager
def pong_only() -> Iterator[str]:
    """A server that answers the first thing said to it with Redis's ``+PONG`` and hangs up:
    the bench's check before the peers passes, then the peers fail (as when Redis goes away
    once they started). Yields its ``redis://`` URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    connection.recv(1024)
                    connection.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def test_a_peer_that_fails_leaves_the_rest_of_the_run(tmp_path: Path) -> None:
    """A peer's run that ended in an error (its Redis gone meanwhile) ended the whole run in
    CalledProcessError, after fanout: no table, no JSON, the peer's traceback on stderr. Now
    that peer's figures are left out, saying why, and the run goes on."""
    out = tmp_path / "out.json"
    with pong_only() as url:
        argv = ["--scenario", "fanout", "--peers", "saq", "arq", "--jobs", "5", "--updates"]
        result = bench(*argv, "2", "--redis", url, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for peer in ("saq", "arq"):
        assert f"[{peer} 5] failed, its figures left out: " in result.stderr
    assert "fanout 5" in result.stdout
    rows = orjson.loads(out.read_bytes())["rows"]
    assert {r["scenario"] for r in rows} == {"fanout 5"}


def test_smoke_keeps_the_sizes_the_command_line_gives() -> None:
    """``--smoke`` wrote its sizes over the command line's: ``--smoke --jobs 20`` ran
    ``fanout 100``, ``--multinode-kills 0`` killed two nodes, and nothing said so."""
    from bench.run import parse_args

    argv = ["--smoke", "--jobs", "20", "--duration", "1", "--queue-jobs", "300"]
    args = parse_args([*argv, "--multinode-kills", "0"])
    assert (args.jobs, args.duration, args.queue_jobs, args.multinode_kills) == ([20], 1, 300, 0)
    assert args.peer_jobs == [20]  # the fanout sizes, as without --smoke
    # The rest are the smoke's.
    assert (args.rate, args.queue_capacity, args.multinode_jobs) == (2000, 100, 20)
    assert parse_args(["--smoke"]).jobs == [100]


def test_a_paced_fanout_is_waited_for_as_long_as_it_takes() -> None:
    """The subscribers waited ``--duration`` * 4 + 60 s whatever the run took: ``--jobs 1
    --rate 0.02 --duration 1`` (its least 2 events, 50 s apart) was cut off at 64 s and failed
    with 4 events lost, none lost; ``--jobs 10000 --running 100`` (100 batches of 4 s) at
    76 s likewise."""
    from bench.run import parse_args, patience, workload

    for argv, jobs, takes in [
        (["--rate", "0.02", "--duration", "1"], 1, 100),
        (["--running", "100"], 10_000, 400),
    ]:
        args = parse_args(argv)
        events, interval, running = workload(args, jobs)
        assert patience(args, events, interval, -(-jobs // running)) >= takes * 4
    back_to_back = parse_args(["--updates", "20"])
    assert patience(back_to_back, 20, 0.0, 10) == 4 * 4 + 60  # as before


def test_more_create_to_start_jobs_than_the_queue_scenario_reads_is_a_usage_error() -> None:
    """``--queue-latency-jobs 700`` ran 500, saying nothing (one list reads them back)."""
    error = refused("--queue-latency-jobs", "700")
    assert "argument --queue-latency-jobs: must be 500 or less, got '700'" in error

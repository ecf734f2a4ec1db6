"""pytest plugin (loaded with `-p py_async_broker_plugin`) that points the
aiormq / aio-pika test suites at an already-running AMQP broker instead of the
docker container their conftest.py would start.

Configuration comes from the environment (set by aiormq.sh / aio-pika.sh):
  PYASYNC_AMQP_PORT   plain AMQP port on 127.0.0.1 (guest/guest, vhost "/")
  PYASYNC_AMQPS_PORT  TLS port on 127.0.0.1, or "none"
  PYASYNC_CERTS_DIR   directory with ca.pem, client.pem, client.key
  PYASYNC_EXCLUDE     file of test ids to deselect ("id  # reason" lines)

What it does, without editing any upstream file:
  * provides the session fixtures `rabbitmq_container` (an object with .host and
    .ports{"5672/tcp","5671/tcp"}, like tests/docker_client.ContainerInfo) and
    `amqp_direct_url`.  aiormq's conftest.py does not define them (the sdist
    relies on them coming from outside), so the plugin's fixtures are used as is.
  * aio-pika's conftest.py defines its own `docker`/`rabbitmq_container`
    fixtures and a pytest_configure() that aborts when no docker daemon is
    reachable.  When that conftest module is registered (before pytest parses
    its fixtures and before pytest_configure runs), the plugin replaces, on the
    module object only, `check_docker_available` with a no-op and
    `rabbitmq_container` with the plugin's fixture.
  * replaces `cert_path()` in the conftest module (aiormq) so that the TLS tests
    use the certificates of CERTS_DIR (same file names as the suite's own
    tests/certs: ca.pem, client.pem, client.key) instead of the suite's own CA,
    whose client certificate the broker would not trust.
  * deselects the ids in the exclude file; marks TLS tests as skipped when
    PYASYNC_AMQPS_PORT is "none".
"""
import os
import sys
from types import SimpleNamespace

import pytest
from yarl import URL

HOST = "127.0.0.1"


def _amqp_port() -> int:
    return int(os.environ["PYASYNC_AMQP_PORT"])


def _amqps_port():
    value = os.environ.get("PYASYNC_AMQPS_PORT", "none")
    return None if value in ("", "none") else int(value)


def _certs_dir() -> str:
    return os.environ.get("PYASYNC_CERTS_DIR", "")


class ContainerInfo(SimpleNamespace):
    """Duck-typed tests.docker_client.ContainerInfo for the running broker."""


def _container_info() -> ContainerInfo:
    tls = _amqps_port()
    # With no TLS listener, point 5671 at a port nothing listens on: the TLS
    # tests are skipped anyway (see pytest_collection_modifyitems).
    return ContainerInfo(
        id="external-broker",
        host=HOST,
        ports={"5672/tcp": _amqp_port(), "5671/tcp": tls or 9},
    )


@pytest.fixture(scope="session")
def rabbitmq_container():
    return _container_info()


@pytest.fixture(scope="session")
def amqp_direct_url(rabbitmq_container) -> URL:
    return URL.build(
        scheme="amqp", user="guest", password="guest", path="//",
        host=rabbitmq_container.host,
        port=rabbitmq_container.ports["5672/tcp"],
    )


def _cert_path(*args):
    return os.path.join(_certs_dir(), *args)


def _patch_conftest(module) -> None:
    if hasattr(module, "check_docker_available"):
        # aio-pika: its pytest_configure() calls this and raises UsageError
        # when it fails.
        module.check_docker_available = lambda: None
    if hasattr(module, "rabbitmq_container"):
        module.rabbitmq_container = rabbitmq_container
    if hasattr(module, "cert_path") and _certs_dir():
        module.cert_path = _cert_path


@pytest.hookimpl(tryfirst=True)
def pytest_plugin_registered(plugin, manager):
    name = getattr(plugin, "__name__", "")
    if name.endswith("conftest") and name.startswith("tests"):
        _patch_conftest(plugin)


def _read_exclude():
    path = os.environ.get("PYASYNC_EXCLUDE")
    ids = set()
    if path and os.path.exists(path):
        with open(path) as fp:
            for line in fp:
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
    return ids


def _is_tls_test(item) -> bool:
    nodeid = item.nodeid
    if "test_amqps.py" in nodeid or "test_ssl_" in nodeid:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        url_id = callspec.params.get("amqp_url")
        if url_id in ("amqps", "amqps-client"):
            return True
    return "[amqps" in nodeid or "-amqps" in nodeid


def _outside_ci_subset(item) -> bool:
    """With WHARF_UPSTREAM_SUBSET=ci (CI's fixed part, see compat/README.md): aiormq runs
    each test over plain TCP and over TLS with a client certificate, not also over the named
    and the certificate-less TLS variants; aio-pika runs each test that is parametrized over
    its two connection factories with `connect` only (`connect_robust` is still covered by
    the tests written for it), and skips test_amqp_robust.py, which runs test_amqp.py's cases
    again over a robust connection (the robust reconnect tests themselves, with their proxy,
    still run). Everything runs without the variable."""
    if os.environ.get("WHARF_UPSTREAM_SUBSET") != "ci":
        return False
    if item.nodeid.startswith("tests/test_amqp_robust.py::"):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    if callspec.params.get("amqp_url") in ("amqp-named", "amqps"):
        return True
    fabric = callspec.params.get("connection_fabric")
    return getattr(fabric, "__name__", "") == "connect_robust"


def pytest_collection_modifyitems(session, config, items):
    excluded = _read_exclude()
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid in excluded or _outside_ci_subset(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if _amqps_port() is None:
        skip = pytest.mark.skip(reason="no AMQPS port given")
        for item in items:
            if _is_tls_test(item):
                item.add_marker(skip)
    unmatched = excluded - {i.nodeid for i in drop}
    if unmatched:
        sys.stderr.write(
            "py_async_broker_plugin: exclude ids not collected:\n  "
            + "\n  ".join(sorted(unmatched)) + "\n",
        )


# --- per-test outcome log ------------------------------------------------
# One line per event, flushed at once, so that the counts survive a run that
# the outer `timeout` has to kill: "start <nodeid>" when a test begins, then
# "<phase> <outcome> <nodeid>" for setup/call/teardown.  The shell script
# turns this into "N passed, M failed" (see py_async_common.sh).

_results_fp = None


def _results_write(line: str) -> None:
    global _results_fp
    path = os.environ.get("PYASYNC_RESULTS")
    if not path:
        return
    if _results_fp is None:
        _results_fp = open(path, "a", buffering=1)
    _results_fp.write(line + "\n")
    _results_fp.flush()


def pytest_runtest_logstart(nodeid, location):
    _results_write("start " + nodeid)


def pytest_runtest_logreport(report):
    _results_write(f"{report.when} {report.outcome} {report.nodeid}")


def pytest_unconfigure(config):
    global _results_fp
    if _results_fp is not None:
        _results_fp.close()
        _results_fp = None

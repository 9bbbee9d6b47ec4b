"""flwr_error: one line naming the cause of a failed ``flwr`` answer, read from flwr's own message.

These messages quote the SuperLink's address, so its digits must never be read as a status code:
CI once reported "answered 403 Forbidden" for a wrong CA because the Control port was 40365.
"""

from __future__ import annotations

import pytest

from fedpriv.deploy.flwr_cli import flwr_error
from fedpriv.deploy.ports import free_port


@pytest.mark.parametrize("port", [40365, 14030, 54403, 4030])
def test_a_port_with_the_digits_403_is_not_a_403(port):
    address = f"127.0.0.1:{port}"
    tls = {"error-message": f"Failed to connect to {address}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"}
    assert flwr_error(tls, address, "/ca.pem").startswith("TLS verification failed")
    other = {"error-message": f"Request to https://{address}/v1/control/list-nodes timed out"}
    assert "Fleet port" not in flwr_error(other, address)


@pytest.mark.parametrize("text", ["HTTP 403", "status code 403 from the server", "403 Forbidden", "Forbidden", "(403)"])
def test_a_real_403_names_the_fleet_port(text):
    address = "127.0.0.1:40365"
    assert "that is the SuperLink's Fleet port" in flwr_error({"error-message": f"{address}: {text}"}, address)


def test_an_unavailable_superlink_with_a_port_like_403xx_is_diagnosed_not_called_a_fleet_port():
    port = free_port()
    address = f"127.0.0.1:{port}"
    line = flwr_error({"error-message": f"{address} is unavailable"}, address, "/nonexistent-ca.pem")
    assert "Fleet port" not in line


def test_flwr_is_not_confused_by_a_folder_named_like_the_connection_in_the_working_directory(tmp_path, monkeypatch):
    """README's walk-through from a folder holding a checkout called ``fedpriv``: flwr 1.41 took the connection
    name ``fedpriv`` for that app folder and failed on a config "migration" instead of registering the region."""
    from fedpriv.deploy.flwr_cli import CONNECTION, run_flwr, write_flwr_home

    (tmp_path / CONNECTION).mkdir()
    (tmp_path / CONNECTION / "pyproject.toml").write_text("[tool.flwr.app]\npublisher = 'x'\n")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "flwr-home"
    write_flwr_home(home, f"127.0.0.1:{free_port()}", None)
    proc = run_flwr(["supernode", "list", CONNECTION, "--format", "json"], home, timeout=60)
    said = proc.stdout + proc.stderr
    assert "migrat" not in said.lower(), said  # it tried the (absent) SuperLink instead
    assert CONNECTION in said or "connect" in said.lower() or "unavailable" in said.lower(), said

"""Self-signed TLS certificates for the servers the TLS tests start (openssl)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["self_signed"]


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A private key (mode 0600) and a self-signed certificate for 127.0.0.1 (its own
    CA), written as ``<name>.key`` and ``<name>.crt`` in ``directory``."""
    key, certificate = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return key, certificate

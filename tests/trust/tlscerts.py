"""Test certificates in QEMU's tls-creds-x509 layout, made with the openssl command.

QEMU (GnuTLS) checks certificate purposes: the CA has CA:TRUE and
keyCertSign, the server certificate serverAuth, the client certificate
clientAuth; both name 127.0.0.1 and localhost.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr}")


def make_ca(d: Path, cn: str = "savevm test CA") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.cnf").write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nCN=" + cn + "\n"
        "[ext]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "30", "-config", "ca.cnf", "-extensions", "ext", cwd=d)


def make_cert(ca: Path, out: Path, role: str, cn: str) -> None:
    """``role``: server or client; files ``{role}-cert.pem`` / ``{role}-key.pem`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    usage = "serverAuth" if role == "server" else "clientAuth"
    cnf = out / f"{role}.cnf"
    cnf.write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nO=savevm tests\nCN=" + cn + "\n"
        "[ext]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out / f"{role}-key.pem"), "-out",
         str(out / f"{role}.csr"), "-config", str(cnf), cwd=out)
    _run("x509", "-req", "-in", str(out / f"{role}.csr"), "-CA", str(ca / "ca-cert.pem"), "-CAkey",
         str(ca / "ca-key.pem"), "-CAcreateserial", "-out", str(out / f"{role}-cert.pem"), "-days", "30",
         "-extfile", str(cnf), "-extensions", "ext", cwd=out)
    (out / f"{role}-key.pem").chmod(0o600)


def creds_dir(root: Path, *, ca: Path, server_cn: str = "localhost", client_cn: str | None = "savevm-source") -> Path:
    """A tls-creds directory: ca-cert.pem and the server pair, plus a client pair if ``client_cn``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca / "ca-cert.pem", root / "ca-cert.pem")
    make_cert(ca, root, "server", server_cn)
    if client_cn is not None:
        make_cert(ca, root, "client", client_cn)
    return root

"""TLS for Dask clusters: the certificate sets dmf makes, and the ``distributed.Security`` a
config asks for.

A Dask scheduler runs whatever code a connected client sends it, as the workers' user. With TLS
(``tls://`` addresses) the scheduler and the workers accept only peers that present a
certificate signed by the cluster's CA, and everything on the wire is encrypted.

:func:`generate` makes a fresh set: a CA, used once to sign one certificate that the scheduler,
the workers and the client all present, and that certificate's key. The CA's own key is
thrown away, so nobody can sign another certificate the cluster would accept. From the shell
(``scripts/slurm_train.sh`` does this)::

    python -m dmf.dist.tls DIR

writes ``DIR/ca.pem``, ``DIR/cert.pem`` and ``DIR/key.pem`` readable by the current user only
(directory 0700, files 0600), and prints the ``--set`` argument that gives them to ``dmf``:
``cluster.security={"ca_file": ..., "cert": ..., "key": ...}``.

This is Dask plumbing only: nothing here knows of ALS, the store or the model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# The name in every certificate dmf makes. Dask does not check host names (its TLS contexts set
# check_hostname=False): trust comes from the CA alone.
COMMON_NAME = "dmf-dask"
FILE_NAMES = {"ca_file": "ca.pem", "cert": "cert.pem", "key": "key.pem"}


@dataclass(frozen=True)
class CertificateSet:
    """PEM texts of a cluster's CA certificate, the certificate every member presents, and
    that certificate's private key (PKCS#8, unencrypted)."""

    ca: str
    cert: str
    key: str

    def security(self):
        """A :class:`distributed.Security` with these PEM texts for every role."""
        return security_from_pem(self.ca, self.cert, self.key)


def generate(days: int = 30) -> CertificateSet:
    """A fresh CA and one certificate it signed, valid for ``days`` days (from 5 minutes ago, to
    allow for clocks of nodes that differ a little). ECDSA P-256 keys, SHA-256 signatures."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(f"{COMMON_NAME} CA"))
        .issuer_name(name(f"{COMMON_NAME} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(COMMON_NAME))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Every member is both a server (scheduler, worker) and a client of the others.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return CertificateSet(
        ca=ca_cert.public_bytes(pem).decode(),
        cert=cert.public_bytes(pem).decode(),
        key=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )


def write(certs: CertificateSet, directory: str | Path) -> dict[str, str]:
    """Write ``certs`` as ``ca.pem``, ``cert.pem`` and ``key.pem`` into ``directory``, readable
    by the current user only (directory 0700, files 0600; files there are replaced).

    Returns the absolute paths as a ``cluster.security`` mapping (``ca_file``, ``cert``,
    ``key``)."""
    d = Path(directory).expanduser().absolute()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    d.chmod(0o700)
    paths = {}
    for field, text in (("ca_file", certs.ca), ("cert", certs.cert), ("key", certs.key)):
        p = d / FILE_NAMES[field]
        p.unlink(missing_ok=True)
        # Created 0600 from the start: the key is never readable by others, not even briefly.
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(p, 0o600)  # whatever the umask was
        paths[field] = str(p)
    return paths


def security_from_pem(ca: str, cert: str, key: str):
    """A :class:`distributed.Security` requiring TLS, with the same CA, certificate and key
    (file paths or PEM texts) for the client, the scheduler and the workers."""
    from distributed import Security

    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmf.dist.tls",
        description="Write a fresh TLS certificate set for a Dask cluster (ca.pem, cert.pem, "
        "key.pem; readable by you only) and print the --set argument that gives it to dmf.",
    )
    parser.add_argument("directory", help="where to write the files (created 0700)")
    parser.add_argument("--days", type=int, default=30, help="validity (default: 30 days)")
    args = parser.parse_args(argv)
    paths = write(generate(days=args.days), args.directory)
    print(f"cluster.security={json.dumps(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

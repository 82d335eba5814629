"""MLflow's environment for this job: which store a run goes to, how long MLflow's HTTP calls may wait, and URIs that
hold a secret. It imports nothing of MLflow; config, mlflow_run, registry, report and preflight use it."""

import contextlib
import os
import re
from pathlib import Path

DEFAULT_STORE = "mlflow.db"


def tracking_uri(configured: str) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def redact(uri: str) -> str:
    """Hide a password or token written into a URI: https://user:secret@host -> https://user:***@host,
    https://TOKEN@host -> https://***@host (http(s) only: postgresql://user@db names a user), ?token=... (or key,
    password, secret, access_token) -> ?token=***."""
    uri = re.sub(r"(//[^/@:]+:)[^/@]+@", r"\1***@", uri)
    uri = re.sub(r"^(https?://)(?![^/@]*\*\*\*@)[^/@:]+@", r"\1***@", uri)  # a bare token (db users stay)
    return re.sub(r"([?&](?:token|access_token|key|api_key|password|secret)=)[^&#]*", r"\1***", uri, flags=re.I)


def password_problem(uri: str, name: str) -> str | None:
    """The one line refusing a URI (called name in it) that holds a password or token; None where it holds none."""
    if redact(uri) == uri:
        return None
    return (f"{name} {redact(uri)} holds a password: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            f"(or MLFLOW_TRACKING_TOKEN) in the environment instead")


# MLflow's HTTP settings the user set in the environment before this job started: ours never override them
USER_SET = {k for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT") if k in os.environ}


def fail_fast() -> None:
    """Unless the user set them: few HTTP retries, so that an absent server costs seconds, not minutes,
    while every rank waits (MLflow's own defaults retry for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


# During training, MLflow's own waits (7 retries with back-off, 120 s timeouts: minutes per call against a hung
# server) are replaced by one short try; the tracker backs off between tries instead.
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def quick():
    """MLflow's HTTP settings of QUICK for a block (the user's own, USER_SET, win; fail_fast's do not)."""
    saved = {k: os.environ.get(k) for k in QUICK}
    os.environ.update({k: v for k, v in QUICK.items() if k not in USER_SET})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None

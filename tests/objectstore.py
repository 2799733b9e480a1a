"""An S3 API on 127.0.0.1 for the tests: moto's standalone server, a real HTTP server in its own process.

Its address and credentials are put in the standard AWS variables when the test session starts (see
tests/conftest.py), before any Ray or download process is forked, so every process of the session
reaches the same store; the server itself starts with the first test that needs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

SECRET = "mmpipe-test-secret-7f3a"  # distinctive: the secrets test greps for it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_environment() -> None:
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="mmpipe-test",
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")


class ObjectStore:
    """moto_server on the port of $AWS_ENDPOINT_URL, or with `auth=True` a second one on a port of its own
    that checks signatures: only `self.credentials` (made through its IAM API) are accepted there."""

    def __init__(self, auth: bool = False):
        self.endpoint = f"http://127.0.0.1:{free_port()}" if auth else os.environ["AWS_ENDPOINT_URL"]
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        # moto answers the first N requests without checking them: here the 3 that make the user below.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"} if auth else None
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.1)
        self.credentials = {}
        if auth:
            iam = self._client("iam")
            iam.create_user(UserName="mmpipe")
            key = iam.create_access_key(UserName="mmpipe")["AccessKey"]
            iam.put_user_policy(UserName="mmpipe", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            self.credentials = {"aws_access_key_id": key["AccessKeyId"],
                                "aws_secret_access_key": key["SecretAccessKey"]}

    def _client(self, service: str):
        import botocore.session

        return botocore.session.get_session().create_client(service, endpoint_url=self.endpoint, **self.credentials)

    def bucket(self) -> str:
        """A new, empty bucket: its s3:// URI."""
        name = f"mmpipe-{uuid.uuid4().hex[:10]}"
        self._client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, prefix: str) -> list[str]:
        """Every object key under an s3://bucket/prefix URI."""
        bucket, _, key = prefix.split("://", 1)[1].partition("/")
        pages = self._client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

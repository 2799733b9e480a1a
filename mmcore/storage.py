"""Where dataset versions and runs live: a local (or mounted) path, or object storage (`s3://bucket/prefix`).

A location becomes a path object: `pathlib.Path` on a disk, a `universal-pathlib` path over s3fs in a
bucket, with the same `/`, `read_text`, `write_text`, `exists`, `iterdir` and `open`. Parquet goes
through pyarrow's own S3 filesystem (it takes the `s3://` string). Both read the endpoint and the
credentials from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` or `~/.aws`); nothing here stores or logs them.

Object storage has no rename: there, what is written becomes visible when the manifest that lists it is
written last (dataset versions, checkpoints, a run's final bundle), and readers accept only what a
manifest vouches for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

REMOTE_SCHEMES = ("s3",)


class StorageError(OSError):
    """Object storage that cannot be used: no such bucket, credentials refused, an endpoint that does not answer."""


def is_remote(location) -> bool:
    return str(location).partition("://")[0] in REMOTE_SCHEMES and "://" in str(location)


def path(location):
    """A local path as `Path`, `s3://bucket/prefix` as a path object over s3fs; other schemes are refused."""
    text = str(location)
    if is_remote(text):
        from upath import UPath

        # No listings cache: another process (a worker, a second node) writes what this one lists.
        return UPath(text.rstrip("/"), use_listings_cache=False)
    if "://" in text:
        raise StorageError(f"{text}: unsupported location; use a local path or s3://bucket/prefix")
    return Path(text)


def root():
    """Where dataset versions (`datasets/`) and runs (`runs/`) go when no location is given:
    $MMPIPE_STORAGE (a directory or s3://bucket/prefix, what every node of a cluster can reach),
    else the project home."""
    from mmcore.config import project_home

    return path(os.environ.get("MMPIPE_STORAGE") or project_home())


def check(location) -> None:
    """One clear error, before any work starts, when `location` is in a bucket that cannot be used."""
    if not is_remote(location):
        return
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket = str(location).split("://", 1)[1].split("/", 1)[0]
    session = botocore.session.get_session()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
    client = session.create_client("s3", config=Config(connect_timeout=5, read_timeout=15,
                                                       retries={"max_attempts": 2, "mode": "standard"}))
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise StorageError(f"{location}: no credentials for object storage; set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY (or a profile in ~/.aws)") from None
    except EndpointConnectionError:
        raise StorageError(f"{location}: the object storage endpoint {endpoint} does not answer "
                           f"(AWS_ENDPOINT_URL)") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{location}: bucket {bucket!r} does not exist at {endpoint}") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise StorageError(f"{location}: {endpoint} refused the credentials for bucket {bucket!r} "
                               f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        raise StorageError(f"{location}: object storage answered {code or err}") from None
    except BotoCoreError as err:
        raise StorageError(f"{location}: object storage at {endpoint} failed: {err}") from None


def sha256(file) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_tree(directory) -> None:
    """Delete a directory (a prefix in a bucket) and everything under it; gone already is fine."""
    if isinstance(directory, Path):
        shutil.rmtree(directory, ignore_errors=True)
    elif directory.exists():
        directory.fs.rm(directory.path, recursive=True)


def upload_tree(local: Path, remote, last: str | None = None, advance_to=None) -> dict[str, str]:
    """Copy every file under `local` to `remote` (the file named `last` after all others), calling
    `advance_to(files done)` after each; returns {relative path: sha256} of what was copied."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    digests = {}
    for done, file in enumerate(files, 1):
        rel = file.relative_to(local).as_posix()
        digests[rel] = sha256(file)
        remote.fs.put_file(str(file), (remote / rel).path)
        if advance_to:
            advance_to(done)
    return digests


def publish(staging: Path, target, last: str | None = None, advance_to=None) -> None:
    """Put the finished local directory `staging` at `target`, replacing what is there: renamed into
    place on a disk, uploaded (the file `last` after all others, see upload_tree), then removed, in a bucket."""
    remove_tree(target)
    if isinstance(target, Path):
        staging.rename(target)
    else:
        upload_tree(staging, target, last=last, advance_to=advance_to)
        shutil.rmtree(staging)


def download_tree(remote, local: Path) -> Path:
    """Copy every object under `remote` into `local` (made anew)."""
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    prefix = remote.path.rstrip("/") + "/"
    for key in remote.fs.find(remote.path):
        target = local / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        remote.fs.get_file(key, str(target))
    return local


def local_copy(directory, scratch: Path) -> Path:
    """A directory to read with local file APIs: `directory` itself on a disk, a download of it into
    `scratch` from a bucket."""
    return directory if isinstance(directory, Path) else download_tree(directory, scratch)


def scratch_dir(run_dir) -> Path:
    """Where a process keeps a run's files that need a local disk (DeepSpeed's checkpoint files, a
    download to load): the run dir itself on a disk, <home>/scratch/<run name> for a run in a bucket."""
    from mmcore.config import project_home

    return run_dir if isinstance(run_dir, Path) else project_home() / "scratch" / run_dir.name


def write_text(file, text: str) -> None:
    """Never seen half-written: a local file is renamed into place; one object PUT is atomic already."""
    if isinstance(file, Path):
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(text)
        tmp.replace(file)
    else:
        file.write_text(text)

"""Object storage (``s3://`` URLs): listing, checking, a local cache of small files, uploading.

DALI reads ``s3://`` objects itself (``fn.io.file.read`` for image trees, ``fn.readers.webdataset``
for tar shards) through the AWS SDK built into it. Everything else an object store needs is done here
with boto3 (the optional extra ``dali-relabel[s3]``): listing a prefix (the files of an image tree,
the objects of a shard set), checking objects before a pipeline is built (so that a missing bucket or
object, or refused credentials, give an error naming the URL instead of a message from inside DALI),
fetching small files once into the user's cache (``index.json``, DALI's index files, the label store)
and uploading a directory (``dali-relabel shard --out s3://...``).

Both clients are configured from the standard AWS variables: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), ``AWS_ENDPOINT_URL`` for any S3-compatible
store (MinIO, Ceph, moto...), ``AWS_REGION`` or
``AWS_DEFAULT_REGION``. Profiles in ``~/.aws`` work for boto3; DALI's SDK reads the variables.

The cache lives in ``$XDG_CACHE_HOME/dali_relabel/remote`` (default ``~/.cache``): one file per URL,
with the object's ETag and size beside it. A changed object (another ETag or size) is fetched again;
ranks on one node fetch it once (a file lock).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, Optional, Tuple

from .errors import DaliRelabelError

SCHEME = "s3://"
#: URL schemes DALI has readers for but this package cannot list (no client here).
_UNLISTABLE = ("gs://",)


class RemoteError(DaliRelabelError, OSError):
    """An object or bucket is missing, access is refused, or the store cannot be reached; the
    message names the URL."""


class NoSuchObjectError(RemoteError, FileNotFoundError):
    """No object at the URL, in a bucket that exists."""


def is_remote(location) -> bool:
    """Whether ``location`` is an object-storage URL (``s3://``); ``gs://`` is refused with advice."""
    if not isinstance(location, str):
        return False
    if location.startswith(_UNLISTABLE):
        raise RemoteError(f"{location}: only s3:// URLs are supported (Google Cloud Storage's S3-compatible "
                          "API, AWS_ENDPOINT_URL=https://storage.googleapis.com with HMAC keys, may serve "
                          "the bucket as s3://...)")
    return location.startswith(SCHEME)


def split(url: str) -> Tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not is_remote(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket:
        raise RemoteError(f"{url}: no bucket in the URL (s3://bucket/prefix)")
    return bucket, key


def join(url: str, *parts: str) -> str:
    """``url`` and ``parts`` joined with single slashes."""
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def parent(url: str) -> str:
    """The URL one level up (``s3://b/x/index.json`` -> ``s3://b/x``)."""
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# -- the client ---------------------------------------------------------------------------------------
def region() -> Optional[str]:
    """``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``None``."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _settings() -> tuple:
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return (os.getpid(), region()) + tuple(os.environ.get(k) for k in keys)


_CLIENTS: Dict[tuple, object] = {}


def client():
    """A boto3 S3 client from the AWS variables (one per process and setting)."""
    settings = _settings()
    if settings not in _CLIENTS:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RemoteError("s3:// URLs need boto3 for listing and checking objects: "
                              "pip install 'dali-relabel[s3]'") from None
        if region() and not os.environ.get("AWS_DEFAULT_REGION"):
            # DALI's AWS SDK and older botocore read AWS_DEFAULT_REGION; keep both in step
            os.environ["AWS_DEFAULT_REGION"] = region()
        _CLIENTS.clear()
        _CLIENTS[settings] = boto3.session.Session().client(
            "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, region_name=region(),
            config=Config(retries={"max_attempts": 3, "mode": "standard"}))
    return _CLIENTS[settings]


def explain(error: Exception, url: str) -> RemoteError:
    """A :class:`RemoteError` naming ``url`` for a botocore error (or anything else)."""
    code = ""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    if code in ("NoSuchBucket",):
        bucket = split(url)[0]
        return RemoteError(f"{url}: the bucket {bucket!r} does not exist (endpoint {endpoint})")
    if code in ("NoSuchKey", "404", "NotFound"):
        return NoSuchObjectError(f"{url}: no such object (endpoint {endpoint})")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "AllAccessDisabled"):
        return RemoteError(f"{url}: access denied ({code}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                           f"(and AWS_SESSION_TOKEN) and the bucket's policy (endpoint {endpoint})")
    name = type(error).__name__
    if name == "NoCredentialsError":
        return RemoteError(f"{url}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return RemoteError(f"{url}: cannot reach the object store at {endpoint} ({error})")
    return RemoteError(f"{url}: {code or name}: {error}")


def _call(url: str, what: Callable):
    try:
        return what()
    except RemoteError:
        raise
    except Exception as error:  # botocore's errors, whatever their class
        if type(error).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer", "urllib3"):
            raise
        raise explain(error, url) from None


def _missing_bucket_or_object(url: str) -> RemoteError:
    """After a 404 on an object: say whether the bucket or the object is missing."""
    bucket, _ = split(url)
    try:
        client().head_bucket(Bucket=bucket)
    except Exception as error:
        problem = explain(error, url)
        if isinstance(problem, NoSuchObjectError):  # HEAD answers a missing bucket with a bare 404
            return RemoteError(f"{url}: the bucket {bucket!r} does not exist "
                               f"(endpoint {os.environ.get('AWS_ENDPOINT_URL') or 'AWS'})")
        return problem
    return NoSuchObjectError(f"{url}: no such object (endpoint {os.environ.get('AWS_ENDPOINT_URL') or 'AWS'})")


def _raise_for(error: Exception, url: str):
    if isinstance(error, RemoteError):
        raise error
    problem = explain(error, url)
    if isinstance(problem, NoSuchObjectError):
        problem = _missing_bucket_or_object(url)
    raise problem from None


# -- reading ------------------------------------------------------------------------------------------
def stat(url: str) -> Tuple[int, str]:
    """``(size in bytes, ETag)`` of the object at ``url``."""
    bucket, key = split(url)
    try:
        head = client().head_object(Bucket=bucket, Key=key)
    except Exception as error:
        _raise_for(error, url)
    return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')


def exists(url: str) -> bool:
    """Whether an object is at ``url`` (a missing bucket or refused access still raise)."""
    try:
        stat(url)
    except NoSuchObjectError:
        return False
    return True


def read_bytes(url: str) -> bytes:
    """The whole object at ``url``."""
    bucket, key = split(url)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        _raise_for(error, url)


def list_objects(url: str) -> Dict[str, int]:
    """``{key relative to url: size}`` of every object under the prefix ``url`` (``url/...``)."""
    bucket, key = split(url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def listing():
        found = {}
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                found[item["Key"][len(prefix):]] = int(item["Size"])
        return found

    return _call(url, listing)


# -- the cache ----------------------------------------------------------------------------------------
def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dali_relabel", "remote")


def cached_copy(url: str, check: Optional[Callable[[str], None]] = None) -> str:
    """A local copy of the object at ``url``, fetched once into :func:`cache_dir` and fetched again
    when the object changes (another ETag or size). ``check(path)`` runs on a new download before it
    is kept (it raises to refuse it). Returns the local path."""
    size, etag = stat(url)
    name = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24] + "-" + basename(url)
    os.makedirs(cache_dir(), exist_ok=True)
    path = os.path.join(cache_dir(), name)
    meta = path + ".json"
    from filelock import FileLock

    with FileLock(path + ".lock"):
        try:
            with open(meta) as f:
                known = json.load(f)
            if known == {"url": url, "size": size, "etag": etag} and os.path.getsize(path) == size:
                return path
        except (OSError, ValueError):
            pass
        partial = f"{path}.partial{os.getpid()}"
        bucket, key = split(url)
        try:
            _call(url, lambda: client().download_file(bucket, key, partial))
            if os.path.getsize(partial) != size:
                raise RemoteError(f"{url}: fetched {os.path.getsize(partial)} bytes of {size}")
            if check is not None:
                check(partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        with open(meta, "w") as f:
            json.dump({"url": url, "size": size, "etag": etag}, f)
    return path


# -- writing ------------------------------------------------------------------------------------------
def upload_directory(directory: str, url: str, last: Tuple[str, ...] = (), progress: bool = False) -> int:
    """Upload every file under ``directory`` to ``url/<relative path>``; the names in ``last`` go
    after all others (an index is published only once what it lists is there). Files already there
    with the same size are left alone (an interrupted upload resumes). Returns the files uploaded."""
    from tqdm import tqdm

    bucket, key = split(url)
    there = list_objects(url)
    files = sorted(os.path.relpath(os.path.join(d, f), directory).replace(os.sep, "/")
                   for d, _, names in os.walk(directory) for f in names if not f.endswith((".partial", ".lock")))
    files.sort(key=lambda rel: rel in last)
    uploaded = 0
    for rel in tqdm(files, unit="file", desc="upload", disable=not progress):
        local = os.path.join(directory, rel)
        if rel not in last and there.get(rel) == os.path.getsize(local):
            continue
        target = join(url, rel)
        _call(target, lambda: client().upload_file(local, bucket, "/".join(p for p in (key.strip("/"), rel) if p)))
        uploaded += 1
    return uploaded

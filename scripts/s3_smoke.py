#!/usr/bin/env python3
"""s3_smoke.py — smoke test of an S3 endpoint (the Ceph RGW from ceph-up.sh).

Usage:
    . /var/tmp/hlfs-ceph/s3.env && python3 scripts/s3_smoke.py [BUCKET]

Reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
(and HLFS_S3_BUCKET, default hlfs-test) from the environment; needs boto3.
Checks put / get / ranged get / head / list (prefix + pagination) / delete,
and what HLFS's storage contract needs for atomic create:
  * PutObject with If-None-Match: * on an existing key must fail with 412;
  * racing conditional PUTs of one new key: exactly one wins, its bytes stick;
  * the same for an object larger than RGW's 4 MiB head stripe;
  * CompleteMultipartUpload with If-None-Match: * (reported, not required);
  * If-Match (compare-and-swap) and boto3's default flexible checksums.
Exit status 0 iff every REQUIRED check passed; prints one line per check.
"""
import os
import sys
import threading
import uuid

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import ClientError

BUCKET = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HLFS_S3_BUCKET", "hlfs-test")
failures = []


def check(name, ok, detail="", required=True):
    tag = "PASS" if ok else ("FAIL" if required else "NO  ")
    print(f"{tag} {name}{': ' + detail if detail else ''}", flush=True)
    if required and not ok:
        failures.append(name)


def client(checksums_when_required=True):
    kw = dict(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    if checksums_when_required:
        # RGW 16.2 does not understand the aws-chunked trailing checksums that
        # boto3 >= 1.36 (and aws-sdk-rust of the same era) send by default.
        kw.update(request_checksum_calculation="when_required",
                  response_checksum_validation="when_required")
    return boto3.client("s3", config=Config(**kw))


def code(e):
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"), e.response.get("Error", {}).get("Code")


def put_inm(s3, key, body):
    """PutObject with If-None-Match: *; returns (http_status, error_code)."""
    try:
        s3.put_object(Bucket=BUCKET, Key=key, Body=body, IfNoneMatch="*")
        return 200, None
    except ClientError as e:
        return code(e)


def main():
    print(f"endpoint {os.environ.get('AWS_ENDPOINT_URL')} bucket {BUCKET} boto3 {boto3.__version__} botocore {botocore.__version__}")
    s3 = client()
    p = f"smoke-{uuid.uuid4().hex[:8]}/"

    # ---- basic object operations
    body = os.urandom(1 << 20)
    s3.put_object(Bucket=BUCKET, Key=p + "a", Body=body)
    got = s3.get_object(Bucket=BUCKET, Key=p + "a")["Body"].read()
    check("put/get 1 MiB", got == body)
    r = s3.get_object(Bucket=BUCKET, Key=p + "a", Range="bytes=1000-5095")
    check("ranged get", r["Body"].read() == body[1000:5096] and r["ResponseMetadata"]["HTTPStatusCode"] == 206,
          r.get("ContentRange", ""))
    r = s3.get_object(Bucket=BUCKET, Key=p + "a", Range=f"bytes={len(body) - 10}-")
    check("ranged get, open end", r["Body"].read() == body[-10:])
    h = s3.head_object(Bucket=BUCKET, Key=p + "a")
    check("head content-length", h["ContentLength"] == len(body))
    try:
        s3.get_object(Bucket=BUCKET, Key=p + "missing")
        check("get missing -> 404", False, "no error")
    except ClientError as e:
        check("get missing -> 404 NoSuchKey", code(e) == (404, "NoSuchKey"), str(code(e)))
    try:
        s3.get_object(Bucket=BUCKET, Key=p + "a", Range=f"bytes={len(body) + 10}-{len(body) + 20}")
        check("range past end -> 416", False, "no error")
    except ClientError as e:
        check("range past end -> 416", code(e)[0] == 416, str(code(e)))

    for i in range(7):
        s3.put_object(Bucket=BUCKET, Key=f"{p}list/{i:03}", Body=b"x")
    keys, token = [], None
    while True:
        kw = dict(Bucket=BUCKET, Prefix=p + "list/", MaxKeys=3)
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            break
        token = r["NextContinuationToken"]
    check("list v2 prefix + pagination", keys == [f"{p}list/{i:03}" for i in range(7)], f"{len(keys)} keys")
    r = s3.list_objects_v2(Bucket=BUCKET, Prefix=p, Delimiter="/")
    check("list with delimiter", [c["Prefix"] for c in r.get("CommonPrefixes", [])] == [p + "list/"])

    # ---- conditional create (If-None-Match: *)
    k = p + "seg-000001"
    st1 = put_inm(s3, k, b"first")
    st2 = put_inm(s3, k, b"second")
    stored = s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()
    check("If-None-Match:* first PUT succeeds", st1 == (200, None), str(st1))
    check("If-None-Match:* second PUT -> 412 PreconditionFailed", st2[0] == 412, str(st2))
    check("If-None-Match:* object unchanged", stored == b"first", repr(stored[:16]))

    def race(key, size, n=16):
        results = [None] * n
        bodies = [bytes([i]) * size for i in range(n)]
        clients = [client() for _ in range(n)]
        barrier = threading.Barrier(n)

        def run(i):
            barrier.wait()
            results[i] = put_inm(clients[i], key, bodies[i])

        ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        winners = [i for i, r in enumerate(results) if r == (200, None)]
        others = sorted({str(r) for r in results if r != (200, None)})
        stored = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        ok = len(winners) == 1 and stored == bodies[winners[0]]
        return ok, f"{len(winners)} winner(s) of {n}; losers got {others}"

    for rnd in range(5):
        ok, d = race(f"{p}race-small-{rnd}", 64 << 10)
        check(f"race 16 conditional PUTs, 64 KiB (round {rnd})", ok, d)
    ok, d = race(p + "race-large", 9 << 20, n=6)
    check("race 6 conditional PUTs, 9 MiB (> 4 MiB head)", ok, d)

    # ---- multipart with If-None-Match on complete (not required by HLFS today)
    def mpu(key, inm):
        up = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        part = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=b"m" * (5 << 20))
        kw = dict(Bucket=BUCKET, Key=key, UploadId=up,
                  MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
        if inm:
            kw["IfNoneMatch"] = "*"
        try:
            s3.complete_multipart_upload(**kw)
            return 200, None
        except ClientError as e:
            try:
                s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)
            except ClientError:
                pass
            return code(e)

    km = p + "mpu"
    a = mpu(km, False)
    check("multipart upload", a == (200, None), str(a))
    b = mpu(km, True)
    check("multipart complete with If-None-Match:* on existing key -> 412", b[0] == 412, str(b), required=False)

    # ---- If-Match on PutObject (compare-and-swap), informational. RGW 16.2
    # compares the header byte for byte with the stored ETag *without* quotes,
    # so the RFC form (quoted, as returned by HEAD) is refused with 412.
    def put_if_match(val):
        try:
            s3.put_object(Bucket=BUCKET, Key=k, Body=b"third", IfMatch=val)
            return 200, None
        except ClientError as e:
            return code(e)

    etag = s3.head_object(Bucket=BUCKET, Key=k)["ETag"]
    r = put_if_match('"0123456789abcdef0123456789abcdef"')
    check("PUT If-Match wrong etag -> 412", r[0] == 412, str(r), required=False)
    r = put_if_match(etag)
    check("PUT If-Match right etag, quoted (RFC form) -> 200", r == (200, None), str(r), required=False)
    r = put_if_match(etag.strip('"'))
    check("PUT If-Match right etag, unquoted -> 200", r == (200, None), str(r), required=False)

    # ---- boto3 default checksums (aws-chunked with trailer)
    try:
        client(False).put_object(Bucket=BUCKET, Key=p + "crc", Body=b"hello")
        r = (200, None)
    except ClientError as e:
        r = code(e)
    check("PUT with boto3-default flexible checksums", r == (200, None), str(r), required=False)

    # ---- delete
    s3.delete_object(Bucket=BUCKET, Key=p + "a")
    try:
        s3.head_object(Bucket=BUCKET, Key=p + "a")
        check("delete", False, "still there")
    except ClientError as e:
        check("delete", code(e)[0] == 404, str(code(e)))
    r = s3.delete_object(Bucket=BUCKET, Key=p + "never-existed")
    check("delete missing key -> 204", r["ResponseMetadata"]["HTTPStatusCode"] == 204)
    # clean up everything under the prefix
    while True:
        r = s3.list_objects_v2(Bucket=BUCKET, Prefix=p)
        objs = [{"Key": o["Key"]} for o in r.get("Contents", [])]
        if not objs:
            break
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": objs, "Quiet": True})
    check("bulk delete leaves prefix empty", s3.list_objects_v2(Bucket=BUCKET, Prefix=p).get("KeyCount") == 0)

    print("RESULT:", "all required checks passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""A third-party plipd client with pika: publish an image batch, then ask a ReID query over RPC.

    python plip_client.py --url amqp://guest:guest@127.0.0.1:5672/%2f \
        publish --id cam1-0001 --person 0007 --camera c1 crop1.jpg crop2.jpg
    python plip_client.py query --text "a man in a navy jacket" --top-k 5
    python plip_client.py query --image crop.jpg --exclude-camera c1

Only pika and the standard library: what a producer in any language has to send.
"""
import argparse
import base64
import json
import sys
import time
import uuid

import pika


def connect(url):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    return conn, conn.channel()


def publish(args):
    conn, ch = connect(args.url)
    ch.confirm_delivery()  # publisher confirms: basic_publish raises if the broker refuses
    images = []
    for i, path in enumerate(args.files):
        with open(path, "rb") as f:
            data = f.read()
        images.append({
            "id": f"{args.id}-{i}" if len(args.files) > 1 else args.id,
            "person_id": args.person,
            "camera_id": args.camera,
            "purpose": args.purpose,
            "image": base64.b64encode(data).decode("ascii"),
        })
    body = json.dumps({"v": 1, "batch_id": args.id, "images": images})
    # Ask for the ingest outcome on a private reply queue.
    reply = ch.queue_declare(queue="", exclusive=True).method.queue
    corr = str(uuid.uuid4())
    ch.basic_publish(
        exchange=args.exchange,
        routing_key="",
        body=body,
        properties=pika.BasicProperties(
            content_type="application/json", delivery_mode=2, reply_to=reply, correlation_id=corr
        ),
    )
    outcome = wait(ch, reply, corr, args.timeout)
    conn.close()
    print(json.dumps(outcome))
    return 0 if not outcome.get("rejected") else 1


def query(args):
    conn, ch = connect(args.url)
    if args.image:
        with open(args.image, "rb") as f:
            q = {"image": base64.b64encode(f.read()).decode("ascii")}
    else:
        q = {"text": args.text}
    req = {"v": 1, "query": q, "top_k": args.top_k}
    if args.exclude_camera:
        req["exclude_camera"] = args.exclude_camera
    if args.min_model_version is not None:
        req["min_model_version"] = args.min_model_version
    reply = ch.queue_declare(queue="", exclusive=True).method.queue
    corr = str(uuid.uuid4())
    ch.basic_publish(
        exchange=args.reid_exchange,
        routing_key="",
        body=json.dumps(req),
        properties=pika.BasicProperties(
            content_type="application/json",
            reply_to=reply,
            correlation_id=corr,
            expiration=str(int(args.timeout * 1000)),
            timestamp=int(time.time()),
        ),
    )
    answer = wait(ch, reply, corr, args.timeout)
    conn.close()
    print(json.dumps(answer))
    return 1 if answer.get("error") else 0


def wait(ch, queue, corr, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        method, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        if props.correlation_id == corr:
            return json.loads(body)
    raise SystemExit(f"no answer within {timeout} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--exchange", default="plip.ingest")
    p.add_argument("--reid-exchange", default="plip.reid")
    p.add_argument("--timeout", type=float, default=30.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="publish images as one batch")
    pub.add_argument("--id", required=True, help="batch id; image ids are ID-0, ID-1, ...")
    pub.add_argument("--person")
    pub.add_argument("--camera")
    pub.add_argument("--purpose", default="both", choices=["train", "gallery", "both"])
    pub.add_argument("files", nargs="+")
    q = sub.add_parser("query", help="ask a ReID query")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--image")
    g.add_argument("--text")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--min-model-version", type=int, default=None,
                   help="refused (model_too_old) by a daemon serving an older version")
    q.add_argument("--exclude-camera")
    args = p.parse_args()
    sys.exit(publish(args) if args.cmd == "publish" else query(args))


if __name__ == "__main__":
    main()

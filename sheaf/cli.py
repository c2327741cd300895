"""The `sheaf` command line: call a running sheaf server's deployments.

    sheaf predict flux --json '{"prompt": "a red fox", "height": 256, "width": 256}'   # writes flux-1a2b3c4d.png
    sheaf predict textgen --json @request.json -o -                                 # the text on stdout
    sheaf predict whisper --audio talk.wav -o talk.txt
    echo '{"history": [1, 2, 3], "horizon": 6}' | sheaf predict forecast --json -   # forecast-….json
    sheaf stream textgen --json '{"prompt": "Once upon a time"}'                    # tokens as they come
    sheaf stream flux --json '{"prompt": "a fox"}' --events                         # JSON Lines, the wire form
    sheaf health textgen ; sheaf ready textgen                                      # exit 1 while not ready
    sheaf submit flux --json '{"prompt": "a fox"}'                                  # {"job_id": "flux-…", …}
    sheaf watch flux-0123abcd…                                                      # as `stream`, resumable

`--url` (or `SHEAF_URL`) names the server, by default http://127.0.0.1:3000. The request type comes from
`model_type` in the JSON, else from the deployment name (flux, whisper, textgen, forecast). `--events -o FILE`
prints the events and writes the result to FILE as well. Exit status: 0 on success, 1 when the server refuses or
fails, 2 for a bad command line or an invalid request.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from sheaf.api import (
    BaseRequest,
    BaseResponse,
    CancelledEvent,
    DiffusionRequest,
    DiffusionResponse,
    ForecastRequest,
    JobEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    SegmentEvent,
    TextGenerationRequest,
    TextGenerationResponse,
    TokenEvent,
    TranscriptionRequest,
    TranscriptionResponse,
)
from sheaf.client import DEFAULT_URL, SheafClient, deployment_of
from sheaf.exceptions import HTTPStatusError, ServerError, StreamError, TransportError, describe_detail
from sheaf.streaming import event_payload

BY_MODEL_TYPE: dict[str, type[BaseRequest[Any]]] = {
    model.model_fields["model_type"].default: model
    for model in (DiffusionRequest, TranscriptionRequest, TextGenerationRequest, ForecastRequest)
}
BY_NAME = {"flux": "diffusion", "whisper": "audio", "textgen": "text_generation", "forecast": "time_series"}


class UsageError(Exception):
    """A bad command line or request: exit 2."""


def build_request(name: str, source: str | None, audio: Path | None) -> BaseRequest[Any]:
    """The typed request from `--json` (text, `@FILE` or `-` for stdin) and `--audio`."""
    try:
        text = "{}" if source is None else sys.stdin.read() if source == "-" else source
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise UsageError("--json must be a JSON object")
        if audio is not None:
            fields["audio_b64"] = base64.b64encode(audio.read_bytes()).decode()
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json is not valid JSON: {exc}") from exc
    model_type = fields.get("model_type", BY_NAME.get(name))
    if not isinstance(model_type, str) or model_type not in BY_MODEL_TYPE:
        known = ", ".join(BY_MODEL_TYPE)
        raise UsageError(f"no request type for {name!r}: give `model_type` in --json (one of {known})")
    try:
        return BY_MODEL_TYPE[model_type].model_validate(fields)
    except ValidationError as exc:
        problems = [{**error, "msg": error["msg"].removeprefix("Value error, ")} for error in exc.errors()]
        raise UsageError("invalid request: " + describe_detail(problems)) from exc


def save(name: str, response: BaseResponse, output: str | None) -> None:
    """Write a response: PNG for an image, the text for text, else JSON; `-` is stdout."""
    if isinstance(response, DiffusionResponse):
        ext, data = "png", base64.b64decode(response.image_b64)
    elif isinstance(response, TextGenerationResponse | TranscriptionResponse):
        ext, data = "txt", response.text.encode()
    else:
        ext, data = "json", json.dumps(response.model_dump(mode="json"), indent=2).encode() + b"\n"
    if output == "-" and ext == "png" and sys.stdout.isatty():
        raise UsageError("not writing a PNG to a terminal: redirect stdout, or give -o FILE")
    if output == "-":
        sys.stdout.buffer.write(data if ext != "txt" else data + b"\n")
        sys.stdout.buffer.flush()
        return
    path = Path(output or f"{name}-{response.request_id[:8]}.{ext}")
    path.write_bytes(data)
    print(f"wrote {path}", file=sys.stderr)


def show(events: Iterator[JobEvent], args: argparse.Namespace) -> None:
    """Print events as they arrive (or each as a JSON line with `--events`), then handle the result."""
    if args.events and args.output == "-":
        raise UsageError("--events prints the events on stdout: give -o FILE, not -o -")
    unfinished: TextIO | None = None  # where a progress bar or streamed text still waits for its newline
    result: BaseResponse | None = None
    try:
        for event in events:
            if isinstance(event, ResultEvent):
                result = event.response
            if args.events:
                print(json.dumps(event_payload(event)), flush=True)
            elif isinstance(event, ProgressEvent):
                done = 20 * event.step // max(event.total_steps, 1)
                bar = "#" * done + "-" * (20 - done)
                print(f"\r{args.name} [{bar}] {event.step}/{event.total_steps}", end="", file=sys.stderr, flush=True)
                unfinished = sys.stderr
            elif isinstance(event, TokenEvent):
                print(event.text, end="", flush=True)
                unfinished = sys.stdout
            elif isinstance(event, SegmentEvent):
                segment = event.segment
                print(f"[{segment.start:.2f} → {segment.end:.2f}] {segment.text.strip()}", flush=True)
            elif isinstance(event, QueuedEvent):
                print(f"\r{args.name} queued, {event.position} ahead", end="", file=sys.stderr, flush=True)
                unfinished = sys.stderr
            elif isinstance(event, CancelledEvent):
                print(f"\r{args.name} job cancelled", end="", file=sys.stderr, flush=True)
                unfinished = sys.stderr
    finally:
        if unfinished is not None:
            print(file=unfinished, flush=True)
    if result is None or (args.events and not args.output):  # --events printed it; -o writes it as well
        return
    if isinstance(result, DiffusionResponse):
        save(args.name, result, args.output)
    elif args.output or not isinstance(result, TextGenerationResponse | TranscriptionResponse):
        save(args.name, result, args.output or "-")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="sheaf", description="Call the deployments of a sheaf server.")
    main_parser.add_argument(
        "--url", default=os.environ.get("SHEAF_URL", DEFAULT_URL), help="the server (env SHEAF_URL; %(default)s)"
    )
    commands = main_parser.add_subparsers(dest="command", required=True)
    for command, summary in [("predict", "one request, the answer to a file"), ("stream", "events as they come")]:
        sub = commands.add_parser(command, help=summary, description=summary)
        sub.add_argument("name", help="the deployment, such as flux, whisper, textgen or forecast")
        sub.add_argument("--json", help="the request: JSON text, @FILE, or - for stdin")
        sub.add_argument("--audio", type=Path, metavar="PATH", help="an audio file, sent base64 as `audio_b64`")
        sub.add_argument("-o", "--output", metavar="PATH", help="the output file, - for stdout (NAME-ID.EXT)")
        if command == "stream":
            sub.add_argument("--events", action="store_true", help="print every event as a JSON line instead")
    summary = "queue a job, which runs whether or not anyone watches; prints its id"
    sub = commands.add_parser("submit", help=summary, description=summary)
    sub.add_argument("name", help="the deployment, such as flux, whisper, textgen or forecast")
    sub.add_argument("--json", help="the request: JSON text, @FILE, or - for stdin")
    sub.add_argument("--audio", type=Path, metavar="PATH", help="an audio file, sent base64 as `audio_b64`")
    summary = "follow a job's events, from its first (again after a dropped connection), then its result"
    sub = commands.add_parser("watch", help=summary, description=summary)
    sub.add_argument("job_id", help="as `submit` printed it")
    sub.add_argument("-o", "--output", metavar="PATH", help="the output file, - for stdout (NAME-ID.EXT)")
    sub.add_argument("--events", action="store_true", help="print every event as a JSON line instead")
    for command in ("health", "ready"):
        commands.add_parser(command, help=f"the deployment's {command} probe").add_argument("name")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with SheafClient(args.url) as client:
            if args.command in ("health", "ready"):
                try:
                    answer = client.health(args.name) if args.command == "health" else client.ready(args.name)
                except ServerError as exc:
                    if exc.status_code != 503:
                        raise
                    print(json.dumps({"detail": exc.detail}))
                    return 1
                print(json.dumps(answer))
                return 0
            if args.command == "watch":
                try:
                    args.name = deployment_of(args.job_id)
                except ValueError as exc:
                    raise UsageError(str(exc)) from exc
                show(client.events(args.job_id), args)
                return 0
            request = build_request(args.name, args.json, args.audio)
            if args.command == "predict":
                save(args.name, client.predict(args.name, request), args.output)
            elif args.command == "submit":
                print(json.dumps(client.submit(args.name, request).model_dump(mode="json")))
            else:
                show(client.stream(args.name, request), args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HTTPStatusError as exc:
        print(f"error: {exc.status_code} {describe_detail(exc.detail)}", file=sys.stderr)
        return 1
    except StreamError as exc:
        print(f"error: stream failed: {exc}", file=sys.stderr)
        return 1
    except TransportError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

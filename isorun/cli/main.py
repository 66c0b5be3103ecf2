"""`isorun`: run, ls, exec, shell, kill, logs, images, keys, usage, daemon. `--json` for scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import httpx

from isorun.cli.progress import ProgressView
from isorun.errors import IsorunError
from isorun.escapes import ON_A_TERMINAL
from isorun.sdk import Images, _core, _daemon, _records
from isorun.sdk._records import ExecResult
from isorun.sdk.sandbox_sync import Sandbox, _client

# Subcommands that take a command to run after `--`.
_WITH_CMD = ("run", "exec", "shell")
_CMD_HELP = (
    "-- CMD...: one argument runs as a shell command line (sh -c 'echo $HOME'), several as an argv"
)


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _http(args: argparse.Namespace) -> httpx.Client:
    s = _daemon.resolve(args.api_url, args.api_key, None)
    _daemon.ensure_daemon(s)
    return _client(s)


def _key_value(text: str) -> tuple[str, str]:
    """argparse type of K=V options (-e, -m): a bad one is a usage error, not a traceback."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


class _RawOutput(_records.StreamDecoder):
    """Copies the command's stdout/stderr bytes to ours as they arrive, unchanged: binary
    output must not pass through a text decoder (the SDK's callbacks get decoded text)."""

    def feed(self, line: str | bytes) -> tuple[str, bytes] | None:
        got = super().feed(line)
        if got is not None:
            out = sys.stdout.buffer if got[0] == "stdout" else sys.stderr.buffer
            out.write(got[1])
            out.flush()
        return got


def _exec(sb: Sandbox, cmd: list[str], *, stream: bool) -> ExecResult:
    """Run cmd in sb (one argument: a shell command line; more: an argv). `stream`: copy the
    output to ours as it comes; else only capture it. Interrupted (^C, or our stdout closed as
    in `| head`), the command is stopped in the sandbox too (as the SDK's exec does), as it
    would be locally, instead of running on there unseen."""
    body = _core.exec_body(cmd if len(cmd) > 1 else cmd[0], None, None, None, None, None, False)
    dec = _RawOutput(capture=False) if stream else _records.StreamDecoder()
    sb._run(dec, body)
    return dec.result()


def _result_json(r: ExecResult) -> dict[str, object]:
    """A command's result for --json: stdout and stderr keep each stream's newest 64 MiB
    (the SDK's capture limit), and *_dropped says how many older bytes were left out."""
    return {
        "exit_code": r.exit_code,
        "signal": r.signal,
        "timed_out": r.timed_out,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "stdout_dropped": r.stdout_dropped,
        "stderr_dropped": r.stderr_dropped,
        "duration_ms": r.duration_ms,
    }


def _exit_code(r: ExecResult) -> int:
    return r.exit_code if r.exit_code is not None else 128 + (r.signal or 0)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.cmd:
        raise SystemExit(
            "isorun run: give a command after --, e.g. isorun run python -- python3 -V"
        )
    env = dict(args.env)
    # On a terminal, show the image pull/build and the boot as they happen.
    view = ProgressView(sys.stderr, tty=True) if sys.stderr.isatty() and not args.json else None
    try:
        sb = Sandbox(
            args.image,
            vcpus=args.vcpus,
            memory_mib=args.memory_mib,
            env=env or None,
            sandbox_timeout=args.timeout,
            api_url=args.api_url,
            api_key=args.api_key,
            on_progress=view,
        )
    finally:
        if view is not None:
            view.finish()
    ran = False
    try:
        r = _exec(sb, args.cmd, stream=not args.json)
        ran = True
    finally:
        try:
            usage = sb.destroy() if not args.keep else None
        finally:
            sb.close()
        # kept, also when interrupted (^C, a closed stdout): its id is the way back to it
        if args.keep and not (ran and args.json):
            print(f"sandbox {sb.id} kept running", file=sys.stderr)
    if args.json:
        print(json.dumps({"sandbox": sb.id, **_result_json(r), "usage": usage}))
    return _exit_code(r)


def cmd_exec(args: argparse.Namespace) -> int:
    _core.url_id("sandbox id", args.id)  # refused before a daemon is looked for
    sb = Sandbox.connect(args.id, api_url=args.api_url, api_key=args.api_key)
    try:
        r = _exec(sb, args.cmd, stream=not args.json)
    finally:
        sb.close()
    if args.json:
        print(json.dumps(_result_json(r)))
    return _exit_code(r)


def cmd_shell(args: argparse.Namespace) -> int:
    from isorun.cli.shell import run_shell

    return run_shell(args.id, args.cmd or None, api_url=args.api_url, api_key=args.api_key)


def cmd_ls(args: argparse.Namespace) -> int:
    meta = dict(args.metadata)
    rows = Sandbox.list(
        metadata=meta, include_ended=args.all, api_url=args.api_url, api_key=args.api_key
    )
    lines = [f"{'ID':22} {'STATE':8} {'IMAGE':24} VCPU  MEM_MIB"] + [
        f"{r['id']:22} {r['state']:8} {r['image'][-24:]:24} {r['vcpus']:4} {r['memory_mib']:8}"
        for r in rows
    ]
    _out(args, rows, "\n".join(lines))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    path = _core.sandbox_path(args.id)
    with _http(args) as c:
        usage = _core.check(c.delete(path))
    # what the answer has of it (a sandbox that ended meanwhile may have no bill yet)
    said = [
        f"{label} {usage[key]}{unit}"
        for key, label, unit in (
            ("cpu_ms", "cpu", " ms"),
            ("mem_peak_bytes", "peak memory", " B"),
            ("uptime_ms", "uptime", " ms"),
            ("billed_seconds", "billed", " s"),
        )
        if isinstance(usage, dict) and key in usage
    ]
    cost = usage.get("cost_usd") if isinstance(usage, dict) else None
    if isinstance(cost, int | float):
        said.append(f"cost ${cost:.6f}")
    _out(args, usage, f"killed {args.id}: {', '.join(said)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    path = _core.sandbox_path(args.id, "logs")
    with _http(args) as c:
        r = c.get(path)
        if r.status_code >= 300:  # a redirect's body is no console either
            _core.check(r, want_json=False)
    text = r.text
    # the guest wrote it: no escape sequences for this terminal (JSON escapes them itself)
    shown = text.replace("\r\n", "\n").translate(ON_A_TERMINAL) if sys.stdout.isatty() else text
    _out(args, {"console": text}, shown)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    if args.action == "pull":
        return cmd_images_pull(args)
    if args.action in ("inspect", "rm", "gc", "du"):
        return cmd_images_manage(args)
    with _http(args) as c:
        imgs = _core.check(c.get("/v1/images"))["images"]
    _out(
        args,
        imgs,
        "\n".join(
            f"{i['digest'][:19]}  {','.join(i['names']):30} {i['size_bytes'] // (1 << 20)} MiB"
            for i in imgs
        ),
    )
    return 0


def cmd_images_manage(args: argparse.Namespace) -> int:
    if args.action in ("inspect", "rm") and not args.ref:
        raise SystemExit(f"isorun images {args.action}: give an image, e.g. python")
    with _http(args) as c:
        if args.action == "inspect":
            res = _core.check(c.get("/v1/images/inspect", params={"ref": args.ref}))
            text = json.dumps(res, indent=2)
        elif args.action == "rm":
            res = _core.check(c.delete("/v1/images", params={"ref": args.ref}))
            text = f"removed {res['removed']} ({res['freed_bytes'] // (1 << 20)} MiB freed)"
        elif args.action == "gc":
            res = _core.check(c.post("/v1/images/gc", params={"all": "1"} if args.all else {}))
            text = f"removed {len(res['removed'])} images, {res['freed_bytes'] // (1 << 20)} MiB"
        else:
            res = _core.check(c.get("/v1/images/usage"))
            text = f"{res['images']} images, {res['image_bytes'] // (1 << 20)} MiB"
    _out(args, res, text)
    return 0


def cmd_images_pull(args: argparse.Namespace) -> int:
    if not args.ref:
        raise SystemExit("isorun images pull: give an image, e.g. isorun images pull python")
    tty = sys.stderr.isatty()
    # --json: progress and the result as JSON lines on stdout; else progress on stderr.
    view = ProgressView(sys.stdout if args.json else sys.stderr, tty=tty, json_lines=args.json)
    images = Images(api_url=args.api_url, api_key=args.api_key)
    try:
        img = images.pull(args.ref, pull="always" if args.always else "missing", on_progress=view)
    except IsorunError as exc:
        view.finish()
        if args.json:
            code = getattr(exc, "code", "") or "error"
            print(json.dumps({"type": "error", "code": code, "message": str(exc)}), flush=True)
            return 1
        raise
    view.finish()
    if args.json:
        print(json.dumps({"type": "image", "image": img}), flush=True)
    else:
        print(f"{img['digest']}  {','.join(img['names'])}  {img['size_bytes'] // (1 << 20)} MiB")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "revoke" and not args.name:
        raise SystemExit("isorun keys revoke: give the key id (see `isorun keys ls`)")
    key_path = f"/v1/keys/{_core.url_id('key id', args.name)}" if args.action == "revoke" else ""
    with _http(args) as c:
        if args.action == "create":
            k = _core.check(c.post("/v1/keys", json={"name": args.name or ""}))
            _out(args, k, f"{k['key']}\n(tenant {k['tenant_id']}; shown once, store it now)")
        elif args.action == "ls":
            keys = _core.check(c.get("/v1/keys"))["keys"]
            _out(
                args,
                keys,
                "\n".join(
                    f"{k['id']}  {k['tenant_id']:16} {k['name']:20} "
                    f"{'revoked' if k['revoked'] else 'active'}"
                    for k in keys
                ),
            )
        else:
            _out(
                args,
                _core.check(c.delete(key_path)),
                f"revoked {args.name}",
            )
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with _http(args) as c:
        u = _core.check(c.get("/v1/usage"))
    t = u["total"]
    _out(
        args,
        u,
        f"{t['sandboxes']} sandboxes, {t['vcpu_seconds']} vCPU-seconds billed, "
        f"cpu {t['cpu_ms']} ms, cost ${t['cost_usd']:.6f} at ${u['price_per_vcpu_hour']}/vCPU-h",
    )
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from isorun.daemon.main import main as daemon_main

    daemon_main(args.rest)
    return 0


def parser(split: bool = False) -> argparse.ArgumentParser:
    """The argument parser. `split`: argv was cut at its first `--` and this parses the part
    before it, so options may follow IMAGE/ID (the command comes from after the `--`)."""
    # Without a `--`, everything after IMAGE/ID is the command, options included.
    cmd_nargs = "*" if split else argparse.REMAINDER
    p = argparse.ArgumentParser(prog="isorun", description="isorun sandboxes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--api-url", help="default $ISORUN_API_URL, else the local unix socket")
    p.add_argument("--api-key", help="default $ISORUN_API_KEY")
    sub = p.add_subparsers(dest="command", required=True)
    # `--json` also after the subcommand (`isorun ls --json`); SUPPRESS keeps a global one.
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    r = sub.add_parser("run", parents=[as_json], help="create a sandbox, run a command, destroy it")
    r.add_argument("image", help="template name (base, python, node) or OCI image reference")
    r.add_argument("cmd", nargs=cmd_nargs, default=[], help=_CMD_HELP)
    r.add_argument("--vcpus", type=int)
    r.add_argument("--memory-mib", type=int)
    r.add_argument("--timeout", type=int, help="sandbox_timeout in seconds")
    r.add_argument(
        "-e", "--env", action="append", default=[], type=_key_value, metavar="K=V", help="env var"
    )
    r.add_argument("--keep", action="store_true", help="do not destroy the sandbox")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("exec", parents=[as_json], help="run a command in a running sandbox")
    e.add_argument("id")
    e.add_argument("cmd", nargs=cmd_nargs, default=[], help=_CMD_HELP)
    e.set_defaults(fn=cmd_exec)
    sh = sub.add_parser(
        "shell", help="interactive terminal in a running sandbox (default: a login shell)"
    )
    sh.add_argument("id")
    sh.add_argument("cmd", nargs=cmd_nargs, default=[], help="-- CMD... instead of the shell")
    sh.set_defaults(fn=cmd_shell)
    ls = sub.add_parser("ls", parents=[as_json], help="list sandboxes")
    ls.add_argument("-a", "--all", action="store_true", help="include ended sandboxes")
    ls.add_argument(
        "-m",
        "--metadata",
        action="append",
        default=[],
        type=_key_value,
        metavar="K=V",
        help="only sandboxes with this metadata",
    )
    ls.set_defaults(fn=cmd_ls)
    for name, fn, hlp in (
        ("kill", cmd_kill, "kill a sandbox (prints its usage)"),
        ("logs", cmd_logs, "guest console of a sandbox"),
    ):
        s = sub.add_parser(name, help=hlp, parents=[as_json])
        s.add_argument("id")
        s.set_defaults(fn=fn)
    # Actions are subcommands of their own, so options may follow REF (`images pull --json
    # python`); two optional positionals side by side would leave REF unparsed after one.
    im = sub.add_parser("images", parents=[as_json], help="images in the daemon's store")
    im_actions = im.add_subparsers(dest="action", metavar="ACTION", help="default: ls")
    im.set_defaults(fn=cmd_images, action="ls", ref=None, always=False, all=False)
    im_actions.add_parser("ls", parents=[as_json], help="list stored images")
    for name, hlp in (
        ("pull", "fetch an image, with progress"),
        ("inspect", "an image's config, layers and names"),
        ("rm", "remove an image no sandbox uses"),
    ):
        a = im_actions.add_parser(name, parents=[as_json], help=hlp)
        a.add_argument("ref", nargs="?", help="template name or image reference")
        if name == "pull":
            a.add_argument("--always", action="store_true", help="re-resolve a cached tag")
    gc = im_actions.add_parser("gc", parents=[as_json], help="remove unused unnamed images")
    gc.add_argument("--all", action="store_true", help="every unused image, named or not")
    im_actions.add_parser("du", parents=[as_json], help="disk used by the store")
    k = sub.add_parser("keys", parents=[as_json], help="API keys (local admin)")
    k_actions = k.add_subparsers(dest="action", metavar="ACTION", required=True)
    k.set_defaults(fn=cmd_keys, name=None)
    k_actions.add_parser("create", parents=[as_json], help="a new key").add_argument(
        "name", nargs="?", help="key name"
    )
    k_actions.add_parser("ls", parents=[as_json], help="list keys")
    k_actions.add_parser("revoke", parents=[as_json], help="revoke a key").add_argument(
        "name", nargs="?", metavar="id", help="key id (see `isorun keys ls`)"
    )
    sub.add_parser("usage", parents=[as_json], help="usage and cost of your API key").set_defaults(
        fn=cmd_usage
    )
    # Every argument after `daemon` (even --help) is isorund's: see _parse.
    d = sub.add_parser("daemon", add_help=False, help="run isorund in the foreground [FLAGS]")
    d.set_defaults(fn=cmd_daemon)
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that what `isorun daemon` does not know (all of its flags, and
    --help) is passed on to isorund as `rest`."""
    args, extra = p.parse_known_args(argv)
    if args.command == "daemon":
        args.rest = extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`isorun run IMAGE [OPTIONS] -- CMD...`: options before the first `--` are ours wherever
    they stand, everything after it is the command (argparse alone would take `--keep` after
    IMAGE as the program to run)."""
    if "--" in argv:
        cut = argv.index("--")
        args = _parse(parser(split=True), argv[:cut])
        # A command begun before the `--` owns it (`grep -- -v f`): parsed whole below.
        if args.command in _WITH_CMD and not args.cmd:
            args.cmd = argv[cut + 1 :]
            return args
    args = _parse(parser(), argv)
    if args.command in _WITH_CMD and args.cmd[:1] and args.cmd[0].startswith("-"):
        raise SystemExit(
            f"isorun {args.command}: {args.cmd[0]!r} is not a command; options go before the"
            f" command, which follows --: isorun {args.command} [OPTIONS] "
            f"{'IMAGE' if args.command == 'run' else 'ID'} -- CMD..."
        )
    return args


def _refuse_non_text(argv: list[str]) -> None:
    """The API carries commands, env and paths as JSON text: an argument that is not UTF-8
    (Python holds its bytes as surrogates) failed later with a codec error naming none."""
    for arg in argv:
        try:
            arg.encode()
        except UnicodeEncodeError:
            print(
                f"isorun: argument {os.fsencode(arg)!r} is not UTF-8 text, which is what the "
                "sandbox API carries",
                file=sys.stderr,
            )
            sys.exit(1)  # an argument error (docs/api.md); 2 is argparse's, with the usage


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _refuse_non_text(argv)
    args = parse_args(argv)
    if args.command in ("run", "exec") and not args.cmd:
        raise SystemExit(f"isorun {args.command}: give a command after --")
    try:
        code = args.fn(args)
    except IsorunError as exc:
        print(f"isorun: {exc}", file=sys.stderr)
        code = 1
    except ValueError as exc:  # what the SDK refuses before asking (a malformed id)
        print(f"isorun: {exc}", file=sys.stderr)
        code = 1
    except (KeyError, TypeError, AttributeError) as exc:
        # an answer of the wrong shape (a proxy's, an older daemon's): one line, as for any
        # other error, not a traceback
        print(f"isorun: unexpected answer from the daemon ({exc!r})", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("isorun: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # Our stdout was closed (`isorun run ... | head`): end quietly, as a local command
        # killed by SIGPIPE would, and keep Python from failing again at its final flush.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13
    sys.exit(code)


if __name__ == "__main__":
    main()

"""``python -m tools.vm``: capture a real guest's memory with ``collect``, or run any command in a guest."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from collector.errors import CollectorError
from tools.vm.guest import Guest
from tools.vm.kernels import KERNEL_KEYS, cache_dir, fetch_kernel

DEFAULT_COLLECT = "collect --profile x86_64 -o {output}"

DESCRIPTION = """\
Boot a real Debian kernel under QEMU (software emulation, KASLR on) with the host's root
filesystem shared read-only, and run commands in it as root from this checkout.
Kernels are downloaded once through apt into $COLLECTOR_VM_CACHE (default ~/.cache/collector/vm).
"""

TRY_EPILOG = """\
examples:
  python -m tools.vm try                          # 6.1 guest, image in the current directory
  python -m tools.vm try --kernel 6.12 --output /tmp/images -- --json
  python -m tools.vm try --command 'head -c 1M /dev/zero | zstd -q > {output}'
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr)
        return 130
    except CollectorError as exc:
        _fail(str(exc))
        return exc.exit_code


def cmd_try(args: argparse.Namespace) -> int:
    output_dir = Path(args.output).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CollectorError(f"--output {output_dir}: {e.strerror}", 2) from None
    extra = [a for a in args.collect_args if a != "--"]
    with Guest(kernel=args.kernel, memory_mib=args.memory, cpu=args.cpu) as guest:
        assert guest.kernel is not None
        name = f"guest-{guest.kernel.version}-{args.memory}M.lime.zst"
        guest_output = f"{guest.guest_out}/{name}"
        command = args.command.replace("{output}", shlex.quote(guest_output))
        if extra:
            command += " " + " ".join(shlex.quote(a) for a in extra)
        print(
            f"vm: booted {guest.kernel.version} ({args.memory} MiB) in {guest.boot_seconds:.1f} s; "
            f"running: {command}",
            file=sys.stderr,
        )
        started = time.monotonic()
        result = guest.run(command, timeout=args.timeout)
        took = time.monotonic() - started
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CollectorError(
                f"{command.split()[0]} exited {result.returncode} in the guest: {last}"
            )
        produced = guest.out_dir / name
        if not produced.is_file():
            raise CollectorError(f"the guest command succeeded but wrote no {guest_output}")
        target = output_dir / name
        shutil.copyfile(produced, target)
    size = target.stat().st_size
    print(f"vm: image {target} ({size / 2**20:.1f} MiB, {took:.1f} s in the guest)")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    words = [a for a in args.command if a != "--"] if args.command[:1] == ["--"] else args.command
    if not words:
        raise CollectorError("shell-command needs a command after --", 2)
    command = words[0] if len(words) == 1 else shlex.join(words)
    with Guest(kernel=args.kernel, memory_mib=args.memory, cpu=args.cpu) as guest:
        result = guest.run(command, timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def cmd_kernels(args: argparse.Namespace) -> int:
    for key in args.kernel or KERNEL_KEYS:
        kernel = fetch_kernel(key)
        print(f"{key}: {kernel.package} {kernel.package_version} (uname -r {kernel.version})")
        print(f"  vmlinuz     {kernel.vmlinuz}")
        print(f"  modules     {kernel.modules_dir}")
        print(f"  config      {kernel.config}")
        print(f"  System.map  {kernel.system_map}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.vm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def guest_options(p: argparse.ArgumentParser, default_timeout: float) -> None:
        p.add_argument(
            "--kernel",
            choices=KERNEL_KEYS,
            default="6.1",
            help="Debian kernel to boot (default: %(default)s)",
        )
        p.add_argument(
            "--memory",
            type=int,
            default=384,
            metavar="MIB",
            help="guest RAM in MiB (default: %(default)s; TCG is slow, keep it small)",
        )
        p.add_argument(
            "--cpu",
            metavar="MODEL",
            help="QEMU -cpu model (default: an x86-64-v2 qemu64; append ,+la57 for 5-level paging)",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=default_timeout,
            metavar="SECONDS",
            help="give up on the guest command after this long (default: %(default)s)",
        )

    p_try = sub.add_parser(
        "try",
        help="capture a guest's memory with collect and copy the image here",
        description="Boot a guest, run collect in it writing to the shared directory, and copy "
        "the image to --output. Arguments after -- are appended to the command.",
        epilog=TRY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    guest_options(p_try, 1800)
    p_try.add_argument(
        "--output",
        default=".",
        metavar="DIR",
        help="where to copy the image (default: the current directory)",
    )
    p_try.add_argument(
        "--command",
        default=DEFAULT_COLLECT,
        metavar="TEMPLATE",
        help="the guest command; {output} is the image path in the guest (default: %(default)r)",
    )
    p_try.add_argument(
        "collect_args", nargs=argparse.REMAINDER, help="after --: extra arguments for collect"
    )
    p_try.set_defaults(func=cmd_try)

    p_shell = sub.add_parser(
        "shell-command",
        help="run one shell command in a guest and print its output",
        description="Boot a guest, run the command as root in the host's root filesystem "
        "(cwd = this checkout), print its output and exit with its status.",
    )
    guest_options(p_shell, 600)
    p_shell.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p_shell.set_defaults(func=cmd_shell)

    p_kernels = sub.add_parser("kernels", help="download (once) and list the kernels")
    p_kernels.add_argument(
        "--kernel", choices=KERNEL_KEYS, action="append", help="only this kernel (repeatable)"
    )
    p_kernels.set_defaults(func=cmd_kernels)
    return parser


def _fail(message: str) -> None:
    first, _, detail = message.partition("\n")
    if detail:
        log = cache_dir() / "last-error.log"
        log.write_text(message + "\n")
        first += f" (details: {log})"
    print(f"vm: error: {first}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

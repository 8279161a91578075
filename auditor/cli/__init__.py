"""The ``resdyn`` command line: a thin Typer layer (options in, renderer out, no math)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer

from ..errors import AuditorError, ExitCode, Remedy
from . import angles, audit, compare, condition, data, extract, reference, stability, trajectory, verify
from .inspect import archs_command, inspect_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="resdyn",
    help="Audit trained ResNets as discrete dynamical systems: conditioning, stability, "
    "class geometry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    """Every command, in the order of ``resdyn --help``; each module's ``register`` adds its own."""
    app.command("inspect")(inspect_command)
    app.command("archs")(archs_command)
    for module in (condition, extract, angles, trajectory, stability, audit, compare, verify, data, reference):
        module.register(app)


_register()


def _version_callback(value: bool) -> None:
    if value:
        from .._version import __version__

        print(f"resdyn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Audit trained ResNets as discrete dynamical systems."""


def flag_for(remedy: Remedy) -> str:
    """The command-line spelling of a library remedy: ``overwrite=True`` -> ``--overwrite``, ``data='DIR'`` -> ``--data DIR``."""
    flag = "--" + remedy.argument.replace("_", "-")
    if remedy.value is False:
        return f"without {flag}"
    return flag if remedy.value is True or remedy.value is None else f"{flag} {remedy.value}"


def _fail(message: str, rank: int | None = None) -> int:
    print(f"resdyn: error: {message}", file=sys.stderr)
    return int(ExitCode.ERROR)


class _Failures:
    """Under torchrun: records this rank's one-line error instead of printing it (see :func:`_run_ranks`)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failure: tuple[int, str] | None = None

    def __call__(self, message: str, rank: int | None = None) -> int:
        origin = self.rank if rank is None else rank
        if rank is None:
            message = f"rank {origin}: {message}"
        self.failure = (origin, message)
        return int(ExitCode.ERROR)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (errors mapped to one line and code 2).

    Warnings raised by libraries (numpy's RuntimeWarning on overflow, ...) are held
    back: a failed run prints only its one-line error; a run that finished prints
    each distinct numerical warning as one ``warning:`` line. With ``RESDYN_DEBUG=1``
    they appear as Python prints them.
    """
    debug = bool(os.environ.get("RESDYN_DEBUG"))
    from ..distributed import launched

    if launched():
        return _run_ranks(argv, debug)
    if debug:
        return _run(argv, debug)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code = _run(argv, debug)
    if code in (ExitCode.OK, ExitCode.RULE_FAILED):
        _show_warnings(caught)
    return code


def _run_ranks(argv: list[str] | None, debug: bool) -> int:
    """One rank of a ``torchrun`` run: every rank works, rank 0 alone speaks and writes.

    Ranks other than 0 run with stdout and stderr sent to the null device (their
    tracebacks stay visible with ``RESDYN_DEBUG=1``). At the end the ranks agree
    on one exit code: 2 with one line naming the lowest failing rank when any
    failed, else rank 0's.
    """
    import contextlib
    import warnings

    from .. import distributed

    fail = _Failures(int(os.environ.get("RANK", 0)))
    together = False  # whether every rank reached the end (RESDYN_DEBUG lets an error escape)
    try:
        here = distributed.init()
    except AuditorError as exc:
        print(f"resdyn: error: rank {fail.rank}: {exc.one_line(flag_for)}", file=sys.stderr)
        return int(ExitCode.ERROR)
    except Exception as exc:  # no rendezvous (a wrong MASTER_ADDR, a peer that never came)
        if debug:
            raise
        print(f"resdyn: error: rank {fail.rank}: cannot join the torchrun process group "
              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", file=sys.stderr)
        return int(ExitCode.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            if not here.is_main:
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
                if not debug:
                    stack.enter_context(contextlib.redirect_stderr(sink))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("default")
            code = _run(argv, debug, fail)
            code, failure = distributed.agree(code, fail.failure)
            together = True
            if failure is not None and here.is_main:
                print(f"resdyn: error: {failure[1]}", file=sys.stderr)
            if code in (ExitCode.OK, ExitCode.RULE_FAILED) and here.is_main:
                _show_warnings(caught)
    finally:
        distributed.shutdown(together=together)
    return code


def _show_warnings(caught: list) -> None:
    """One line per distinct warning worth the user's attention (numerical, or resdyn's own)."""
    seen: set[str] = set()
    for record in caught:
        own = (record.filename or "").replace(os.sep, "/").find("/auditor/") >= 0
        if not (own or issubclass(record.category, RuntimeWarning)):
            continue  # a library's deprecation notes are not the user's business
        text = " ".join(str(record.message).split())
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr)


def _run(argv: list[str] | None, debug: bool, fail: Callable[..., int] = _fail) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="resdyn", standalone_mode=False)
    except AuditorError as exc:
        if debug:
            raise
        origin = getattr(exc, "rank", None)  # a distributed.RankError already names its rank
        return fail(exc.one_line(flag_for)) if origin is None else fail(exc.one_line(flag_for), origin)
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except typer.Abort:
        return int(ExitCode.INTERRUPTED)
    except typer.TyperException as exc:  # the vendored Click's exceptions (usage errors) derive from it
        # ``resdyn`` alone: the help text, on stderr. Matched by name, as typer's own
        # rich_utils does, since the class is not public API.
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            return int(ExitCode.ERROR)
        if debug:
            raise
        context = getattr(exc, "ctx", None)
        where = f" (see '{context.command_path} --help')" if context is not None else ""
        return fail(" ".join(exc.format_message().split()) + where)
    except KeyboardInterrupt:
        print("resdyn: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # the reader closed the pipe (``| head``): it has what it wanted
        return int(ExitCode.OK)
    except SystemExit as exc:  # click and rich end with exit(1) when a write meets the closed pipe
        if isinstance(exc.__context__, BrokenPipeError):
            return int(ExitCode.OK)
        raise
    except Exception as exc:  # an internal error: still one line and exit 2
        if debug:
            raise
        return fail(f"internal error: {type(exc).__name__}: {exc}. Set RESDYN_DEBUG=1 for the traceback.")
    return int(result) if isinstance(result, int) else int(ExitCode.OK)


def main() -> None:
    """Console entry point (owns the process: applies the process-wide settings).

    A reader that closes the pipe early (``resdyn archs | head``) is not an error: exit 0, as
    ``cat`` and ``ls`` do (see :func:`_run`); the output still buffered is dropped.
    """
    from ..runtime import keep_freed_memory

    keep_freed_memory()
    code = run(sys.argv[1:])
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is gone: Python's own flush at exit must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)

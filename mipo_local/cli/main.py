"""`mipo-local`: the command-line entry point. Thin: parse, call the library, print.

With no sub-command it opens the terminal app. Library errors (MipoError) become one `Error: ...` line on
stderr and a non-zero exit; Ctrl-C becomes `Cancelled` (exit 130) after the job has saved its work.
"""

from __future__ import annotations

import errno
import importlib
import os
import sqlite3
import sys

import click

from ..errors import MipoError

# One module per command group; each defines `register(cli)`. Add new groups here.
COMMAND_MODULES = [
    "mipo_local.cli.setup_cmd",  # init, status
    "mipo_local.cli.models_cmd",  # models list|info|pull
    "mipo_local.cli.context_cmd",  # context add|list|rm|edit
    "mipo_local.cli.prompts_cmd",  # prompts add|import|list|rm (synth lives with pairs)
    "mipo_local.cli.pairs_cmd",  # pairs, pairs list|show|review|rm|export|import, prompts synth
    "mipo_local.cli.feedback_cmd",  # feedback list|rm
    "mipo_local.cli.train_cmd",  # train, runs list|show
    "mipo_local.cli.export_cmd",  # export, exports list
    "mipo_local.cli.eval_cmd",  # eval, chat
    "mipo_local.cli.run_cmd",  # run (the whole pipeline)
]


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--workspace",
    "-w",
    type=click.Path(file_okay=False),
    default=None,
    help="Workspace directory (default: $MIPO_LOCAL_HOME, else $XDG_DATA_HOME/mipo-local/default).",
)
@click.version_option(package_name="mipo-local")
@click.pass_context
def cli(ctx: click.Context, workspace: str | None) -> None:
    """Personalize a small local LLM with MIPO + LoRA DPO, privately, on this machine.

    Run without a command to open the terminal app. Typical flow:

    \b
      mipo-local init
      mipo-local context add "I am a nurse in Lyon; answer briefly, in French."
      mipo-local prompts add "What should I cook tonight?"
      mipo-local run            # synth prompts, pairs, train, export, eval
      mipo-local chat
    """
    ctx.ensure_object(dict)
    ctx.obj["workspace"] = workspace
    if ctx.invoked_subcommand is None:
        from tui.app import run_app  # the UI is imported only when asked for

        run_app(workspace)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


# A full disk or a place that cannot be written is the user's to fix, not a bug: one line, like any other bad
# input. Every write is atomic (temp file + rename, SQLite transactions), so what was there before is intact.
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
PLACE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EEXIST}
DISK_HINT = "nothing was half-written. Free some disk space and run the same command again."


def os_error_line(err: OSError) -> str | None:
    """The one line for an OSError the user can fix (a full disk, a read-only or missing place), or None."""
    where = f" {err.filename}" if err.filename else ""
    if err.errno in FULL_ERRNOS or (err.errno is None and "No space left" in str(err)):
        return f"The disk is full: could not write{where}; {DISK_HINT}"
    if err.errno in DENIED_ERRNOS:
        return f"Cannot write{where or ' there'}: {err.strerror} (a read-only or protected place); nothing was changed."
    if err.errno in PLACE_ERRNOS and err.filename:
        return f"Cannot use{where}: {err.strerror}; nothing was changed."
    return None


def _error(message: str) -> None:
    """One line on stderr, whatever the message quotes back: a user's value with a line break or a
    terminal escape in it is shown escaped, not obeyed."""
    line = "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in message.strip())
    click.echo(f"Error: {line}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    os.umask(
        0o077
    )  # everything mipo-local writes (pairs, checkpoints, Modelfiles) is readable by its owner only
    try:
        cli.main(args=argv, prog_name="mipo-local", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        # One line like every other error (click's default adds a usage block); the help hint stays on it.
        where = f" See `{exc.ctx.command_path} --help`." if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{where}")
        return exc.exit_code
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Cancelled.", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("Cancelled. Finished work was saved; run the same command again to resume.", err=True)
        return 130
    except MipoError as err:
        _error(str(err))
        return err.exit_code
    except OSError as err:
        line = os_error_line(err)
        if line is None:
            raise  # anything else is a bug, and its traceback is what a bug report needs
        _error(line)
        return 1
    except sqlite3.OperationalError as err:
        text = str(err)
        if "readonly database" in text or "unable to open database" in text:
            _error(f"the workspace database cannot be written ({err}); nothing was changed.")
        elif "disk is full" in text or "disk I/O error" in text:
            _error(f"the workspace database could not be written ({err}); {DISK_HINT}")
        else:
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

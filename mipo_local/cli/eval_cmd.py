"""`mipo-local eval` and `mipo-local chat`."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import click

from .. import user_pairs
from ..conversation import ChatSession, resolve_chat_model, system_from_contexts
from ..errors import UserInputError, WorkspaceError
from ..evaluate import evaluate
from ..modelsource import base_model
from ..plots import training_plot_text
from ..settings import AnswerSettings, EvalSettings, with_overrides
from ..train import runs as run_store
from .common import ID, drive, open_workspace, table


@click.command("eval")
@click.option("--run", "run_name", default=None, help="Evaluate the newest export of this run.")
@click.option(
    "--export", "export_id", type=ID, default=None, help="Evaluate this export id (default: the newest)."
)
@click.option("--n", type=int, default=None, help="Held-out prompts to use (default: 16).")
@click.option(
    "--judge",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A judge GGUF that scores answers 1-5.",
)
@click.option("--seed", type=int, default=None, help="Sampling seed (default: 0).")
@click.option("--max-tokens", type=int, default=None, help="Longest sampled answer in tokens (default: 192).")
@click.option(
    "--plot/--no-plot", default=True, show_default=True, help="Draw the training curve in the terminal."
)
@click.pass_context
def eval_cmd(
    ctx: click.Context, run_name: str | None, export_id: int | None, judge: Path | None, plot: bool, **options
) -> None:
    """Measure the exported model against the base on held-out prompts (through llama.cpp)."""
    ws = open_workspace(ctx)
    if run_name is not None and export_id is None:
        run = run_store.require_run(ws, run_name)
        rows = ws.query("SELECT id FROM exports WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run.id,))
        if not rows:
            raise WorkspaceError(
                f"The run '{run_name}' has no export yet; run `mipo-local export --run {run_name}`."
            )
        export_id = rows[0]["id"]
    settings = with_overrides(EvalSettings(), **options)
    r = drive(evaluate(ws, settings, export_id=export_id, judge=judge))
    click.echo(f"Evaluation of export #{r.export_id} (run {r.run}) on {r.n_pairs} held-out pairs:")
    rows = [
        ["held-out pair accuracy", "", f"{r.pair_accuracy:.2f}"],
        ["mean DPO margin", "", f"{r.mean_margin:+.4f}"],
        ["context sensitivity (PMI, nats)", f"{r.base.pmi:+.3f}", f"{r.personalized.pmi:+.3f}"],
        ["neutral text log-prob / token", f"{r.base.neutral_logp:.4f}", f"{r.personalized.neutral_logp:.4f}"],
        ["drift", "", f"{r.drift * 100:+.2f}%"],
    ]
    if r.judge:
        rows.append(["judge score (1-5)", f"{r.base.judge:.2f}", f"{r.personalized.judge:.2f}"])
        rows.append(
            ["judge win / tie / loss", "", f"{r.judge['win']} / {r.judge['tie']} / {r.judge['loss']}"]
        )
    table(rows, ["metric", "base", "personalized"])
    if r.drift > 0.02:
        click.echo(
            "warning: neutral-text drift above 2%: the model may be damaged; lower --lr or --epochs.",
            err=True,
        )
    if plot:
        run = run_store.require_run(ws, r.run)
        click.echo(
            training_plot_text(
                run_store.read_log(ws, run.id), width=min(100, shutil.get_terminal_size().columns)
            )
        )
    click.echo(f"Report and plot saved in {ws.root / 'evals'}.")


@click.command()
@click.option(
    "--model",
    "spec",
    default="latest",
    show_default=True,
    help="base, latest (the newest export) or a GGUF path.",
)
@click.option(
    "--system-from-contexts/--no-system",
    default=True,
    show_default=True,
    help="Use your contexts as the system turn.",
)
@click.option(
    "--temperature",
    type=float,
    default=AnswerSettings.temperature,
    show_default=True,
    help="Sampling temperature.",
)
@click.option(
    "--max-tokens", type=int, default=AnswerSettings.max_tokens, show_default=True, help="Longest answer."
)
@click.pass_context
def chat(
    ctx: click.Context, spec: str, system_from_contexts: bool, temperature: float, max_tokens: int
) -> None:
    """Chat with your personalized model (streaming). Type /compare to see base and personalized side by side,
    /reset to clear the history, /quit to leave.

    Mark the last answer and the next `train` learns from it: /good keeps it as a chosen answer (its
    rejected side is sampled under another persona, as MIPO does); /better TEXT gives the answer you
    wanted instead; /bad alone samples a fresh answer under your context and asks whether it is better.
    """
    ws = open_workspace(ctx)
    base = base_model(ws)
    system = system_from_contexts and _system(ws)
    main = ChatSession(
        resolve_chat_model(ws, spec), base.file, system or None, temperature, max_tokens=max_tokens
    )
    other = None
    click.echo(f"Chatting with {main.model.label}. /good, /bad, /better TEXT, /compare, /reset, /quit.")
    compare = False
    try:
        while True:
            try:
                message = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.exceptions.Abort):
                break
            if message.strip() in ("/quit", "/exit"):
                break
            if message.strip() == "/reset":
                main.history.clear()
                if other:
                    other.history.clear()
                continue
            if message.strip() == "/compare":
                compare = not compare
                if compare and other is None:
                    other = ChatSession(
                        resolve_chat_model(ws, "base"),
                        base.file,
                        main.system,
                        temperature,
                        max_tokens=max_tokens,
                    )
                click.echo(f"Side-by-side comparison {'on' if compare else 'off'}.")
                continue
            if not message.strip():
                continue
            command = message.strip().split(maxsplit=1)
            if command[0] in THUMBS:
                _thumb(ws, main, command[0], command[1] if len(command) > 1 else "")
                continue
            if not compare:
                click.echo(f"{main.model.label}> ", nl=False)
                for piece in main.reply(message):
                    click.echo(piece, nl=False)
                click.echo()
            else:
                a = "".join(main.reply(message))
                b = "".join(other.reply(message))
                _side_by_side(f"{main.model.label}", a, "base", b)
    finally:
        main.close()
        if other:
            other.close()


THUMBS = ("/good", "/bad", "/better")


def _thumb(ws, session: ChatSession, command: str, text: str) -> None:
    """/good, /bad or /better TEXT on the last answer: one pair of yours, or a line saying why not."""
    if len(session.history) < 2:
        click.echo("There is no answer to mark yet; send a message first.")
        return
    prompt, answer = session.history[-2]["content"], session.history[-1]["content"]
    try:
        if command == "/good":
            click.echo("Sampling an answer under another persona to set against it...")
            pair = user_pairs.save_chat_good(ws, prompt, answer)
        elif command == "/better" or text:
            if not text.strip():
                raise UserInputError("/better needs the answer you wanted: /better TEXT.")
            pair = user_pairs.save_chat_better(ws, prompt, answer, text)
        else:
            click.echo("Sampling a fresh answer under your context...")
            better = user_pairs.sample_better(ws, prompt, answer)
            click.echo(f"--- sampled ---\n{better}\n---")
            if not click.confirm("Is this one better than the answer you marked?", default=False):
                click.echo("Nothing saved. Write the answer you wanted with /better TEXT.")
                return
            pair = user_pairs.save_chat_better(ws, prompt, answer, better)
    except UserInputError as err:  # a bad /better text: say so and keep chatting
        click.echo(f"Error: {err}")
        return
    click.echo(f"Saved pair {pair.id} (yours); `mipo-local feedback list` shows it.")


def _system(ws) -> str | None:
    return system_from_contexts(ws)


def _side_by_side(title_a: str, a: str, title_b: str, b: str) -> None:
    width = max(30, (shutil.get_terminal_size().columns - 3) // 2)
    left = [title_a.upper(), *textwrap.wrap(a, width)]
    right = [title_b.upper(), *textwrap.wrap(b, width)]
    for i in range(max(len(left), len(right))):
        la = left[i] if i < len(left) else ""
        rb = right[i] if i < len(right) else ""
        click.echo(f"{la.ljust(width)} | {rb}")


def register(cli: click.Group) -> None:
    cli.add_command(eval_cmd)
    cli.add_command(chat)

"""The Train section: the form's defaults, a few real LoRA DPO steps, cancel and resume, live curves."""

from __future__ import annotations

from textual.widgets import Input, Label, Static

from mipo_local.settings import TrainSettings
from mipo_local.train import runs
from tests.test_tui_core import drive, settle
from tests.trainhelp import insert_pairs, signal_pairs
from tui.widgets.job_runner import JobRunner

FAST = {
    "lr": "1e-3",
    "other_context_kl": "0",
    "rank": "4",
    "grad_accum": "2",
    "max_len": "96",
    "threads": "1",
    "user_weight": "3",
}


def test_form_shows_the_library_defaults(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    defaults = TrainSettings()

    async def scenario(app, pilot):
        await pilot.press("4")
        form = {
            name: app.screen.query_one(f"#f-{name}", Input).value
            for name in ("epochs", "lr", "sft_weight", "other_context_kl", "user_weight", "rank", "max_len")
        }
        assert form == {
            "epochs": str(defaults.epochs),
            "lr": str(defaults.lr),
            "sft_weight": str(defaults.sft_weight),
            "other_context_kl": str(defaults.other_context_kl),
            "user_weight": str(defaults.user_weight),
            "rank": str(defaults.rank),
            "max_len": str(defaults.max_len),
        }
        assert app.screen.query_one("#f-threads", Input).value == ""

    drive(tiny_workspace.root, scenario)


def test_train_cancel_resume_and_plot(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    insert_pairs(tiny_workspace, signal_pairs(6))  # 5 train + 1 held-out pairs: 3 steps of 2
    state = {"cancelled": False}

    def cancel_after_first_step(message):
        if isinstance(message, JobRunner.Progressed) and message.event.done >= 1 and not state["cancelled"]:
            state["cancelled"] = True
            message.runner.cancel()

    async def scenario(app, pilot):
        await pilot.press("4")
        for name, value in FAST.items():
            app.screen.query_one(f"#f-{name}", Input).value = value
        await pilot.press("s")
        await settle(app, pilot)
        run = runs.get_run(tiny_workspace, "run-1")
        assert run.status == "cancelled"
        await pilot.press("r")
        await settle(app, pilot)
        line = str(app.screen.query_one("#run-state", Static).render())
        assert "run-1: finished · step 3/3 · loss" in line
        plot = app.screen.query_one("#plot-loss")
        assert "train" in str(plot.render())

    notes = drive(tiny_workspace.root, scenario, hook=cancel_after_first_step)
    run = runs.get_run(tiny_workspace, "run-1")
    assert run.status == "finished" and run.summary["steps"] == 3
    assert (
        run.settings["rank"] == 4 and run.settings["threads"] == 1 and run.settings["other_context_kl"] == 0
    )
    assert run.settings["user_weight"] == 3.0  # the form's weight for the user's own pairs reaches the run
    steps = [x["step"] for x in runs.read_log(tiny_workspace, run.id, "train")]
    assert steps == [1, 2, 3]
    assert any(n.title == "Cancelled" for n in notes)
    assert any("Run run-1 finished: 3 steps on 5 pairs" in n.message for n in notes)


def test_after_a_restart_the_screen_shows_the_last_run_with_curves(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    model = {"path": "tiny.gguf"}
    done = runs.create_run(tiny_workspace, "run-1", "torch", {}, model)
    for step, loss in ((1, 0.69), (2, 0.52), (3, 0.41)):
        runs.log(tiny_workspace, done.id, step, "train", {
            "loss": loss, "margin": 0.1 * step, "accuracy": 0.5, "tokens_per_s": 100.0,
        })  # fmt: skip
    runs.set_status(tiny_workspace, done.id, "finished", {"steps": 3})
    stopped = runs.create_run(tiny_workspace, "run-2", "torch", {}, model)  # stopped before a step
    runs.set_status(tiny_workspace, stopped.id, "cancelled")

    async def scenario(app, pilot):
        await pilot.press("4")
        await pilot.pause()
        line = str(app.screen.query_one("#run-state", Static).render())
        assert line.startswith("run-1: finished · step 3/? · loss 0.4100")
        plot = str(app.screen.query_one("#plot-loss").render())
        assert "train" in plot and "0.69" in plot  # the curve is drawn, with its axis labels

    drive(tiny_workspace.root, scenario)


def test_a_non_number_shows_beside_the_form_and_keys_go_to_the_field(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    insert_pairs(tiny_workspace, signal_pairs(4))

    async def scenario(app, pilot):
        await pilot.press("4")
        field = app.screen.query_one("#f-lr", Input)
        field.value = "fast"
        await pilot.press("s")
        error = app.screen.query_one("#train-error", Label)
        assert error.display and str(error.render()) == "The learning rate must be a number, not 'fast'."
        assert app.focused is field
        field.value = ""
        await pilot.press(*"rs")  # s and r are hotkeys here: they must edit the field
        assert field.value == "rs" and not app.screen.query_one(JobRunner).busy
        app.screen.query_one("#f-epochs", Input).value = "two"
        field.value = "1e-3"
        await pilot.click("#start")
        assert str(error.render()) == "The epochs must be a whole number, not 'two'."

    notes = drive(tiny_workspace.root, scenario)
    assert not [n for n in notes if n.severity == "error"]  # beside the field, not a notification
    assert runs.list_runs(tiny_workspace) == []

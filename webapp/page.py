"""The app's page and API, wired in Gradio: the prompt, the controls drawn from the sampling settings' table,
the Model panel, and the endpoints (webapp.generation's handlers)."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

import gradio as gr
from gradio.data_classes import ImageData

import serve
from model.card import EXAMPLE_PROMPTS
from model.sampling import RANDOM_SEED, SETTINGS
from serve import policy

from . import guards
from .generation import Generation

QUEUE_SIZE = 32
# the page's Stop is live only while a run is on: idle, there is nothing for it to stop
STOP_IDLE, STOP_RUNNING = dict(variant="secondary", interactive=False), dict(variant="stop", interactive=True)
RUNNING = "*Generating…*"  # the stats line while a run is on: the last run's figures are not this one's


def sampling_controls(block_size: int) -> list[gr.components.Component]:
    """The sliders (one per sampling setting, in SETTINGS' order, from what a visitor starts from and bounded by
    the served ranges) and the seed box, after the max-new-tokens slider: on_page's parameters after the prompt."""
    sliders = [
        gr.Slider(*setting.served, value=setting.start, step=1 if setting.whole else 0.05, info=setting.meaning,
                  label=name.replace("top_", "Top-").replace("_", " ").capitalize(), elem_id=name.replace("_", "-"))
        for name, setting in SETTINGS.items()
    ]  # fmt: skip
    return [
        gr.Slider(
            1, block_size, value=policy.new_tokens(block_size), step=1, label="Max new tokens", elem_id="max-new-tokens"
        ),
        *sliders,
        gr.Number(value=RANDOM_SEED, precision=0, label="Seed", info="blank or -1 = random", elem_id="seed"),
    ]


def inline_image(path: Path, **options) -> gr.Image:
    """A gr.Image of the file at path whose value is the file's bytes (a data: URL), not Gradio's copy of the
    file in its cache, whose absolute path /config and the page would name. (Set after construction: a
    subclass of gr.Image would have Gradio write a .pyi stub beside this file.)"""
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    url = f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    image = gr.Image(**options)
    image.value = ImageData(url=url, orig_name=path.name, mime_type=kind).model_dump()
    return image


def model_panel(facts: serve.ModelFacts) -> None:
    with gr.Accordion("Model", open=True):
        gr.Markdown("".join(f"- **{k}**: {v}\n" for k, v in facts.rows()), elem_id="model-facts")
        if facts.loss_curve:
            curve = dict(label=facts.curve_label(), buttons=["fullscreen", "download"], elem_id="loss-curve")
            inline_image(Path(facts.loss_curve), **curve)  # labelled with the steps it draws: a fine-tune's only
            if facts.curve_note():
                gr.Markdown(facts.curve_note(), elem_id="loss-curve-note")


def build(
    scheduler: serve.Scheduler,
    facts: serve.ModelFacts,
    tokenizer,
    update_seconds: float = serve.UPDATE_SECONDS,
    unread_seconds: float = guards.UNREAD_SECONDS,
) -> gr.Blocks:
    generation = Generation(scheduler, tokenizer, lambda: demo, update_seconds, unread_seconds)
    # every way in shares one limit: each running call is one row of the scheduler's batch
    limits = dict(concurrency_id="generation", concurrency_limit=scheduler.max_batch)
    with gr.Blocks(title="ShakespeareGPT") as demo:
        gr.Markdown("# ShakespeareGPT\nA GPT-2 trained on Tiny Shakespeare. Give it a line and it writes on.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(value=policy.FIRST_PROMPT, label="Prompt", lines=3, elem_id="prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", elem_id="stop", **STOP_IDLE)
                    clear_button = gr.Button("Clear", elem_id="clear")
                output = gr.Textbox(
                    label="Prompt + continuation", lines=14, interactive=False, buttons=["copy"], elem_id="output"
                )
                view = gr.Checkbox(False, label="Show probabilities", elem_id="show-probabilities",
                                   info="each new token coloured by how likely the model found it; hover or tap "
                                   "a token for the 5 likeliest")  # fmt: skip
                probabilities = gr.HTML(visible=False, elem_id="probabilities")
                stats = gr.Markdown(elem_id="stats")
                examples = gr.Examples(
                    [[e] for e in EXAMPLE_PROMPTS],
                    inputs=[prompt],
                    cache_examples=False,
                    api_visibility="private",
                )
            with gr.Column(scale=2):
                settings = sampling_controls(scheduler.model.config.block_size)
                model_panel(facts)

        # Raw values reach the handlers, which check them themselves: the API sees exactly what callers sent.
        # the run's figures show when it ends (or is stopped): the page's sign that it is done
        run_stats = gr.State("")
        page = dict(fn=generation.on_page, inputs=[prompt, *settings, view], outputs=[output, run_stats, probabilities])
        page |= dict(api_visibility="private", preprocess=False, show_progress="minimal", **limits)
        # a run starts with Stop live and the stats line saying so, and ends (done, stopped or refused: a refusal
        # leaves the last run's text and so its figures) with Stop idle again
        starting = dict(fn=lambda: (gr.update(**STOP_RUNNING), RUNNING), outputs=[stop_button, stats])
        starting |= dict(api_visibility="private", queue=False, show_progress="hidden")
        run = generate_button.click(**starting).then(**page)
        example_run = examples.load_input_event.then(**starting).then(**page)
        ended = dict(fn=lambda summary: (summary, gr.update(**STOP_IDLE)), inputs=run_stats)
        for event in (run, example_run, stop_button.click(None, cancels=[run, example_run])):
            event.then(**ended, outputs=[stats, stop_button], api_visibility="private", queue=False)
        view.change(lambda on: gr.update(visible=on), view, probabilities, api_visibility="private", queue=False)
        clear_button.click(None, js="() => ['', '', '', '']", outputs=[prompt, output, stats, probabilities])
        gr.api(generation.generate, api_name="generate", **limits)
        gr.api(generation.generate_with_probabilities, api_name="generate_with_probabilities", **limits)
        gr.api(generation.generate_with_probabilities_json, api_name="generate_with_probabilities_json", **limits)
    return demo.queue(max_size=QUEUE_SIZE)

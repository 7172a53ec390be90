"""An HTTP server for PaliGemma: OpenAI-compatible chat completions, detect/segment objects as JSON, a web page.

    python -m mlx_paligemma.server --model mlx-community/paligemma2-3b-mix-224-bf16

`worker` runs the generation engine in one thread (continuous batching across requests), `chat` turns an OpenAI
request into a checked job, `app` is the HTTP side (Starlette on uvicorn), `index.html` the page served at `/`.
"""

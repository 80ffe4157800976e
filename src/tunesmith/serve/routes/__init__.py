"""The server's routes by family, each an `APIRouter` that `create_app` includes behind the API-key check:
`models` (GET /v1/models; /health, open to all), `completions` (POST /v1/completions), `chat`
(POST /v1/chat/completions), `conversations` (/v1/conversations), `classify` (POST /classify), `adapters`
(POST /v1/load_lora_adapter, /v1/unload_lora_adapter), `web` (the page, /v1/runs, /v1/reports) and `feedback`
(/v1/feedback). Routes find what they serve on `request.app.state` (`engine`, `settings`, `store`, `turns`,
`prompts`, `feedback`), never in a closure, so each module can be read and tested alone; what they share is in
`common`."""

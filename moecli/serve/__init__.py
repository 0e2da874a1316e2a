"""The HTTP server (`moecli serve`): OpenAI- and ollama-compatible routes over one engine thread."""

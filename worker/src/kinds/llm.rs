//! `llm`: an OpenAI-compatible `/v1/chat/completions` call with `stream: true`.
//! (Being built: see issue "Worker pools that hold real agent work".)

use serde::Deserialize;

/// `[llm]` in the worker's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// e.g. `https://api.openai.com`, `http://127.0.0.1:11434` (Ollama), a vLLM or llama.cpp server.
    pub base_url: String,
    /// The environment variable holding the API key (never the key itself in the file).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The model a task gets when it does not name one.
    pub model: String,
}

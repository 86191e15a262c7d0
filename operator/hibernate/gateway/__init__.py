"""The wake-on-request gateway: an OpenAI-compatible front that holds requests for sleeping models,
wakes them through their ModelDeployment and marks activity for the idle ladder (docs/gateway.md)."""

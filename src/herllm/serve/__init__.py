"""`herllm serve`: an OpenAI-compatible server over a run's adapters (issue #17).

`app.create_app(deps)` is the app factory; `routes` and `admin` the route groups; `schemas` the
bodies; `auth` the bearer tokens; `exchange` one request from check to log row; `generation`
the token stream; `versions` the adapter versions and the hot swap; `log` the interaction log;
`log_source` the log as a followed stream for the learner; `learn` the learner beside the
server; `metrics` Prometheus. The server reads adapters and never trains.
"""

"""The verbs of `edge-fleet`, one module per group: `jobs` (prompt), `bundles` (keygen, sign,
verify, pack, serve), `updates` (update, rollout) and `certs`. Each module defines its verbs'
arguments next to their handlers, with `args` holding the argument shapes several verbs share;
`fleet.cli` assembles the parser and runs the chosen handler."""

"""Fuzzing guests: the harness convention, libFuzzer's mutator, crash triage (docs/fuzzing.md).

Modules: ``harness`` (boot to READY, snapshot, run one input, classify), ``outcome`` (how an
execution ended), ``idt`` (the crash-reporting IDT), ``engine`` (libFuzzer through atheris in a
child process), ``campaign`` (the loop, stats, progress line), ``triage`` (deduplicated crash
files), ``cli`` (``hvjit fuzz``, ``hvjit run --input``), ``example`` (a parser with a planted
bug). Nothing is imported eagerly: the engine's child runs without the package.
"""

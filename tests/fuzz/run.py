"""Coverage-guided fuzzing of one target with atheris (libFuzzer):

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]
    python -m tests.fuzz.run secagg_client -max_total_time=60 /tmp/corpus tests/fuzz/corpus/secagg_client

Only ``asagiri``'s protocol code is instrumented.  New coverage goes into the first corpus folder; a crash is
written as ``crash-<sha1>`` in the working folder (``-artifact_prefix=``), and the process exits
non-zero.  Copy a crash into ``tests/fuzz/corpus/<target>/`` once fixed: ``test_fuzz.py`` replays
every file there.
"""

from __future__ import annotations

import sys

import atheris

# numba's compiled kernels cannot hold atheris's probes, and the learning code is no target
NOT_INSTRUMENTED = ["asagiri.secagg.kernels", "asagiri.data", "asagiri.models", "asagiri.privacy", "asagiri.train",
                    "asagiri.site.worker"]

with atheris.instrument_imports(include=["asagiri"], exclude=NOT_INSTRUMENTED):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options] [corpus ...]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

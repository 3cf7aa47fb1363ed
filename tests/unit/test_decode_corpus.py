"""hvjit's decoder against iced-x86 on the .text of this machine's binaries, in all modes.

The default run decodes HVJIT_DECODE_CORPUS_MB (default 1) MB of real 64-bit code, and the
same bytes again in 32- and 16-bit mode (iced decodes any byte stream in any mode). Set
HVJIT_DECODE_CORPUS_MB=30 for the full run. What counts as agreement is documented in
hvjit.benchmarks.corpus (compare_with_iced); in short:

* every instruction iced decodes must be OK in hvjit with the same length, displacement
  (value and size), immediates (value and size), memory base/index/scale and, for
  general-purpose instructions, operand size;
* every byte hvjit calls INVALID must be invalid for iced too;
* iced-invalid bytes that hvjit decodes with a length ("iced stricter": semantic #UD cases
  such as undefined mandatory-prefix columns or 3DNow! suffixes) are counted, not failed;
* documented field exceptions: the is4 register byte of 4-operand VEX/XOP instructions
  (FMA4, vpcmov, vpperm...) is an imm8 for hvjit and a register for iced.
"""

import os

import pytest

from hvjit.benchmarks.corpus import compare_with_iced, text_corpus

pytest.importorskip("iced_x86")

CORPUS_MB = float(os.environ.get("HVJIT_DECODE_CORPUS_MB", "1"))


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return text_corpus(int(CORPUS_MB * (1 << 20)))


@pytest.mark.parametrize("bitness", [64, 32, 16])
def test_real_code_agrees_with_iced(corpus, bitness):
    report = compare_with_iced(corpus, bitness)
    print(f"\n{len(corpus)} bytes: {report.summary()}")
    details = report.summary() + "\n" + "\n".join(report.examples)
    assert report.both_valid > len(corpus) // 8, details
    assert report.length_agreement == 1.0, details
    assert report.disagreements == 0, details
    if bitness == 64:
        # Compiler output is valid 64-bit code; the few data bytes hand-written assembly leaves
        # in .text must be ones iced rejects too (a disagreement otherwise).
        assert report.iced_stricter == 0, details
        assert report.both_invalid <= 16 * max(CORPUS_MB, 1), details

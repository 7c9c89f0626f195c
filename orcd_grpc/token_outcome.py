"""What one sampled token means for its sample: the text it adds to the stream (through the sample's
StreamDecoder, which holds back possible stop-string prefixes) and the reason the sample ends with
it, if it does. Run on the engine thread by the scheduler, once per accepted token, in order."""
from __future__ import annotations

from .request import LENGTH, STOP_STRING, STOP_TOKEN, Request, Sample


def judge(engine, req: Request, smp: Sample, tid: int) -> tuple[str, str | None, str]:
    """(text, reason or None, matched stop string) for token `tid`, already appended to smp.generated."""
    st, generated = req.stopping, smp.generated
    early = len(generated) < st.min_tokens  # the sampler's mask kept stop tokens out
    if not early and (tid in st.stop_token_ids or (not st.ignore_eos and tid in engine.tokenizer.eos_ids)):
        # A stop token is not text, but text held back as a possible stop-string prefix is
        # real output now that no stop string can complete.
        return smp.decoder.flush(), STOP_TOKEN, ""
    text, hit = smp.decoder.push(tid, match=False) if early else smp.decoder.push(tid)
    if hit is not None:
        return text, STOP_STRING, hit
    if smp.seq.constraint is not None and smp.seq.constraint.done:
        return text + smp.decoder.flush(), STOP_TOKEN, ""  # the constraint's language allows nothing more
    if (st.max_tokens and len(generated) >= st.max_tokens) or \
            req.prompt_tokens + len(generated) >= engine.info.context_length:
        return text + smp.decoder.flush(), LENGTH, ""
    return text, None, ""


def alternatives(tokenizer, sample) -> list[tuple[int, str, float]]:
    """The sample's top-logprob alternatives as (id, text, logprob); a token that is part of a UTF-8
    character shows replacement characters."""
    top = []
    for alt_id, alt_lp in (getattr(sample, "top", None) or []):
        try:
            alt_text = tokenizer.token_bytes(int(alt_id)).decode("utf-8", "replace")
        except Exception:
            alt_text = ""
        top.append((int(alt_id), alt_text, float(alt_lp)))
    return top

"CLIPTokenizer: identical ids to transformers' CLIPTokenizer on a large seeded corpus, bad input, loading, speed."
import gzip, importlib.util, json, random, shutil, sys, time, unicodedata, warnings
from pathlib import Path
import pytest
import torch
from minidiff.core import CheckpointNotFoundError, MICRO_SD
from minidiff.tokenizer import (CLIPTokenizer, find_bpe_file, BPE_FILE_NAME, MAX_CACHED_WORDS, NUM_OPENAI_MERGES,
                                BOS_TOKEN_ID, EOS_TOKEN_ID, read_merges, vocab_from_merges)

SHIPPED = MICRO_SD/'tokenizer'  # the real CLIP ViT-L/14 vocabulary, shipped as package data
TOKENIZER_FILES = ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']
# OpenAI's clip package (clip-anytorch) is an optional reference: found without importing it (that pulls torchvision)
needs_clip = pytest.mark.skipif(importlib.util.find_spec('clip') is None,
                                reason="optional reference: OpenAI's clip package (clip-anytorch) is not installed")

SD_TOKENIZER_CONFIGS = Path(__file__).parents[1]/'nbs'/'configs'/'runwayml_stable-diffusion-v1-5'/'tokenizer'
KNOWN_IDS = {  # ids of openai/clip-vit-large-patch14's tokenizer (SD v1.x tokenizer/), as transformers gives them
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of an astronaut riding a horse on mars": [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
    "": [49406, 49407],
    "a red cat playing with a ball": [49406, 320, 736, 2368, 1629, 593, 320, 1069, 49407],
    "hello world": [49406, 3306, 1002, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
}

@pytest.fixture(scope='module')
def tok(): return CLIPTokenizer.from_pretrained(MICRO_SD, subfolder='tokenizer')

@pytest.fixture(scope='module')
def folder(tok, tmp_path_factory): return tok.save_pretrained(tmp_path_factory.mktemp('sd')/'tokenizer')

@pytest.fixture(scope='module')
def hf():
    import transformers
    return transformers.CLIPTokenizer.from_pretrained(SHIPPED)

# ---------------------------------------------------------------- corpus
WORDS = ("a photo of the an astronaut riding horse on mars cat dog painting portrait by greg rutkowski trending "
         "artstation highly detailed 8k unreal engine octane render cinematic lighting bokeh beautiful woman man "
         "city night cyberpunk fantasy landscape mountains river sunset oil canvas watercolor sketch anime style "
         "studio ghibli photorealistic hyperrealistic masterpiece best quality ultra sharp focus illustration").split()
PUNCT = ["!", "!!!", "?!", "...", ",", ";", ":-)", "(", "))", "[", "]", "{", "}", "--", "—", "–", "/", "\\", "|",
         "@", "#", "$", "%", "^", "&", "*", "_", "+", "=", "~", "`", '"', "''", "'", "«", "»", "„", "“", "”", "•",
         "…", "¿", "¡", "§", "°", "±", "×", "÷", "©", "®", "™", "<", ">", "<|", "|>", "<||>", "((((", "::"]
CONTRACTIONS = ["it's", "IT'S", "don't", "DON'T", "we're", "they've", "I'm", "you'll", "he'd", "cat's", "dogs'",
                "o'clock", "rock'n'roll", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'x", "''s",
                "it’s", "y'all'd've", "'", "''", "'''"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-5", "+3", "1e-5", "3rd", "2x", "4k", "1080p", "½",
           "²", "٣٤", "१२", "Ⅻ", "①", "𝟘𝟙", "⁴²", "٫", "0x1F", "v1.5", "SD1.5", "50%", "$100", "12:30"]
ACCENTS = ["café", "cafe\u0301", "naïve", "nai\u0308ve", "Ångström", "A\u030angstro\u0308m", "Zoë", "Tiếng Việt",
           "STRAẞE", "straße", "İstanbul", "ıi", "ΟΔΥΣΣΕΥΣ", "Σ", "ΣΑΣ.", "ὈΔΥΣΣΕΎΣ", "Москва", "ЁЛКА", "Ǆemal",
           "ǅ", "ﬁsh", "Ⓐⓑ", "ŉ", "ΐ", "Ꭰ", "ꭰ", "Ɐ", "ᲀ", "\u0345", "Åström", "crème brûlée", "jalapeño", "façade"]
CJK = ["你好世界", "东京タワー", "ひらがなカタカナ", "ｶﾀｶﾅ", "ＡＢＣ１２３", "한국어", "안녕하세요", "\u1100\u1161\u11a8",
       "中文，标点。", "「引用」", "日本語の文章です", "漢字", "𠀀𠀁", "ㄱㄴㄷ", "ไทย", "हिन्दी", "العربية", "עברית",
       "ქართული", "Ελληνικά", "ᚠᛇᚻ", "ꦗꦮ", "𓀀", "ⴰⵣ"]
EMOJI = ["🙂", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🇺🇸🇬🇧", "❤️", "❤", "✨", "🔥🔥", "🐱‍👤", "🏳️‍🌈", "©️", "#️⃣",
         "👩🏿‍🚀", "🫠", "🧑‍🎨", "☕", "⌚", "\U0001F600x"]
HTML = ["&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&quot;hi&quot;", "&nbsp;", "&amp;amp;", "&#x263A;", "&copy;",
        "<b>bold</b>", "<br/>", "a&b", "&"]
MOJIBAKE = ["cafÃ©", "â€™", "Ã¼ber", "Ã©tÃ©", "â€œquoteâ€\x9d", "Ã±", "ÐœÐ¾Ñ\x81ÐºÐ²Ð°", "\ufffd", "ï»¿", "Â"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\xa0", "\u1680", "\u2000", "\u2003", "\u2009", "\u200a",
          "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\x85", "\u200b", "\u200c", "\u200d", "\ufeff",
          "\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\x00", "\x07", "\x7f", "\u00ad", "\u2060"]
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "<|endoftext", "endoftext|>",
            "<|endoftext|><|endoftext|>", "<| endoftext |>", "< |startoftext| >", "x<|endoftext|>y",
            "<|startoftext|>a", "A<|StartOfText|>B", "<|endoftext|>'s", "<|startoftext|>\u0301"]

def _assigned_chars():
    "Characters assigned in this Python's Unicode tables (which all three libraries agree on), no surrogates."
    return [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != 'Cn']

def make_corpus(n=6000, seed=0):
    "Seeded prompts mixing every kind of fragment, plus edge cases and prompts far over 77 tokens."
    rng = random.Random(seed)
    chars = _assigned_chars()
    kinds = [WORDS, WORDS, WORDS, PUNCT, CONTRACTIONS, NUMBERS, ACCENTS, CJK, EMOJI, HTML, MOJIBAKE, SPACES, SPECIALS]
    seps = [" ", " ", " ", "", ", ", "\n", "\t", "  "]
    def fragment():
        if rng.random() < 0.05: return "".join(rng.choice(chars) for _ in range(rng.randint(1, 4)))
        f = rng.choice(rng.choice(kinds))
        return f.upper() if rng.random() < 0.1 else f.title() if rng.random() < 0.1 else f
    prompts = ["", " ", "\n\t ", "<|endoftext|>", "<|startoftext|>", *SPECIALS, *KNOWN_IDS]
    prompts += [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(n // 6)]  # plain English
    prompts += [" ".join(rng.choices(WORDS, k=rng.randint(60, 200))) for _ in range(n // 20)]  # far over 77
    while len(prompts) < n:
        prompts.append(rng.choice(seps).join(fragment() for _ in range(rng.randint(1, rng.choice([5, 20, 120])))))
    return prompts

@pytest.fixture(scope='module')
def corpus(): return make_corpus()

# ---------------------------------------------------------------- parity
def test_known_ids(tok, hf):
    for text, ids in KNOWN_IDS.items(): assert tok.encode(text) == hf(text)['input_ids'] == ids, text
    out = tok("a photograph of an astronaut riding a horse", padding="max_length", max_length=77)
    assert out.input_ids == KNOWN_IDS["a photograph of an astronaut riding a horse"] + [49407] * 67

def test_corpus_ids_match_transformers(tok, hf, corpus):
    ours = [tok.encode(p) for p in corpus]
    theirs = hf(corpus)['input_ids']
    matches = sum(a == b for a, b in zip(ours, theirs))
    print(f"\ncorpus: {len(corpus)} prompts, {sum(map(len, theirs))} tokens; identical ids: {matches}/{len(corpus)}")
    assert len(corpus) >= 5000 and max(map(len, theirs)) > 300
    bad = [(p, a, b) for p, a, b in zip(corpus, ours, theirs) if a != b]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"

@pytest.mark.parametrize('kw', [dict(padding="max_length", max_length=77, truncation=True),
                                dict(padding=True, truncation=True), dict(padding="longest"),
                                dict(padding="max_length", max_length=20, truncation=True),
                                dict(padding=False, truncation=True, max_length=10)])
def test_corpus_batches_match_transformers(tok, hf, corpus, kw):
    prompts = corpus[::7]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ours = tok(prompts, **kw)
    theirs = hf(prompts, **kw)
    assert ours.input_ids == theirs['input_ids'] and ours['attention_mask'] == theirs['attention_mask']

def test_tensors_match_transformers(tok, hf, corpus):
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ours = tok(corpus[:500], **kw)
    theirs = hf(corpus[:500], **kw)
    assert ours.input_ids.dtype == theirs['input_ids'].dtype == torch.long
    assert torch.equal(ours.input_ids, theirs['input_ids']) and torch.equal(ours.attention_mask, theirs['attention_mask'])

def test_decode_matches_transformers(tok, hf, corpus):
    ids = hf(corpus[::3])['input_ids']
    for skip in (False, True):
        assert tok.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    rng = random.Random(1)  # arbitrary id sequences, including half characters and special tokens in the middle
    seqs = [[rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))] for _ in range(1000)]
    for skip in (False, True):
        assert tok.batch_decode(seqs, skip_special_tokens=skip) == hf.batch_decode(seqs, skip_special_tokens=skip)
    assert tok.decode(torch.tensor(ids[7])) == hf.decode(ids[7])

def test_vocab_and_token_lookups_match_transformers(tok, hf):
    assert tok.get_vocab() == hf.get_vocab() and len(tok) == len(hf) == tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    toks = ["a</w>", "photo</w>", "<|endoftext|>", "not-a-token", "Ġ", "in"]
    assert tok.convert_tokens_to_ids(toks) == hf.convert_tokens_to_ids(toks)
    assert tok.convert_ids_to_tokens([320, 49406, 0, 511]) == hf.convert_ids_to_tokens([320, 49406, 0, 511])
    assert tok.tokenize("A Bokeh photo, 2024!") == hf.tokenize("A Bokeh photo, 2024!")
    assert tok.model_max_length == hf.model_max_length == 77

def test_real_sd_tokenizer_configs(tok, folder, tmp_path):
    "The real SD v1.5 tokenizer_config.json / special_tokens_map.json load, and ours are written the same way."
    for f in SD_TOKENIZER_CONFIGS.iterdir():
        ours, real = json.loads((folder/f.name).read_text()), json.loads(f.read_text())
        assert ours == {k: v for k, v in real.items() if k not in ('name_or_path', 'special_tokens_map_file')}, f.name
    sd = tmp_path/'sd'/'tokenizer'; sd.mkdir(parents=True)
    for f in ['vocab.json', 'merges.txt']: shutil.copy(folder/f, sd/f)
    for f in SD_TOKENIZER_CONFIGS.iterdir(): shutil.copy(f, sd/f.name)
    t = CLIPTokenizer.from_pretrained(tmp_path/'sd', subfolder='tokenizer')
    assert t.encoder == tok.encoder and t.merges == tok.merges and t.special_tokens == tok.special_tokens
    assert t.model_max_length == 77

def test_bare_folder_matches_transformers(tok, folder, tmp_path):
    "Without tokenizer_config.json the special tokens are plain text (not normalized) in both libraries."
    import transformers
    for f in ['vocab.json', 'merges.txt']: shutil.copy(folder/f, tmp_path/f)
    ours, theirs = CLIPTokenizer.from_pretrained(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    prompts = SPECIALS + ["a <|STARTOFTEXT|> b", "<|startoftext|>"]
    assert [ours.encode(p) for p in prompts] == theirs(prompts)['input_ids']
    assert ours.encode("<|STARTOFTEXT|>") != tok.encode("<|STARTOFTEXT|>")

def test_saved_folder_round_trip(tok, folder):
    t = CLIPTokenizer.from_pretrained(folder)
    assert len(tok) == tok.vocab_size == 49408
    assert (t.encoder, t.merges, t.special_tokens, t.model_max_length) == (tok.encoder, tok.merges, tok.special_tokens, 77)
    assert sorted(p.name for p in folder.iterdir()) == ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']
    assert (folder/'merges.txt').read_text().split('\n')[:3] == ['#version: 0.2', 'i n', 't h']

def test_shipped_folder(tok, tmp_path):
    "The shipped vocab.json is derived from merges.txt, and loading then saving the folder gives the same bytes."
    merges = read_merges(SHIPPED/'merges.txt')
    assert len(merges) == NUM_OPENAI_MERGES and merges[:2] == [('i', 'n'), ('t', 'h')]
    assert vocab_from_merges(merges) == json.loads((SHIPPED/'vocab.json').read_text(encoding='utf-8')) == tok.encoder
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (BOS_TOKEN_ID, EOS_TOKEN_ID,
                                                                                            EOS_TOKEN_ID, 77)
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(p.name for p in tmp_path.iterdir()) == TOKENIZER_FILES
    for f in TOKENIZER_FILES: assert (tmp_path/f).read_bytes() == (SHIPPED/f).read_bytes(), f

@needs_clip
def test_shipped_folder_is_openai_bpe_file(tmp_path):
    "The shipped folder is byte for byte what from_bpe_file() (OpenAI's gz in the clip package) saves."
    CLIPTokenizer.from_bpe_file().save_pretrained(tmp_path)
    for f in TOKENIZER_FILES: assert (tmp_path/f).read_bytes() == (SHIPPED/f).read_bytes(), f

@needs_clip
def test_find_bpe_file_does_not_import_clip():
    had_clip = 'clip' in sys.modules
    p = find_bpe_file()
    assert p.name == BPE_FILE_NAME and p.is_file() and p.parent.name == 'clip'
    assert had_clip or 'clip' not in sys.modules
    rules = gzip.open(p).read().decode('utf-8').split('\n')[1:]
    assert read_merges(SHIPPED/'merges.txt') == [tuple(l.split()) for l in rules[:NUM_OPENAI_MERGES]]

@needs_clip
def test_openai_simple_tokenizer_differences(tok):
    """OpenAI's SimpleTokenizer (clip/simple_tokenizer.py, loaded without importing clip) runs ftfy and html.unescape,
    matches lowercased special-token text and lowercases Σ by context; transformers (and we) do none of these."""
    bpe_path = find_bpe_file()
    spec = importlib.util.spec_from_file_location('openai_simple_tokenizer', bpe_path.parent/'simple_tokenizer.py')
    openai_st = importlib.util.module_from_spec(spec); spec.loader.exec_module(openai_st)
    openai_tok = openai_st.SimpleTokenizer(str(bpe_path))
    openai_ids = lambda s: [BOS_TOKEN_ID, *openai_tok.encode(s), EOS_TOKEN_ID]
    agree = {"a photo of a cat": True, "  x\u00a0y  ": True, "fish &amp; chips": False, "cafÃ© au lait": False,
             "ΣΑΣ": False, "a <|ENDOFTEXT|> b": False}
    assert {s: openai_ids(s) == tok.encode(s) for s in agree} == agree
    assert tok.decode(openai_ids("fish &amp; chips"), True) == "fish & chips"
    assert tok.decode(openai_ids("cafÃ© au lait"), True) == "café au lait"
    assert tok.decode(openai_ids("ΣΑΣ"), True) == "σας" and tok.decode(tok.encode("ΣΑΣ"), True) == "σασ"
    typed = "a <|ENDOFTEXT|> b"
    assert openai_ids(typed)[2] == EOS_TOKEN_ID and EOS_TOKEN_ID not in tok.encode(typed)[1:-1]

# ---------------------------------------------------------------- call behaviour
def test_outputs(tok):
    out = tok(["a cat", "a photo of a dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert out.input_ids.shape == out['attention_mask'].shape == (2, 77) and out[0] is out.input_ids
    assert (out.input_ids[:, 0] == 49406).all() and out.attention_mask.sum().item() == 4 + 7
    single = tok("a cat", padding=True)
    assert single.input_ids == [49406, 320, 2368, 49407] and single.attention_mask == [1, 1, 1, 1]
    long = tok("cat " * 100, padding="max_length")  # no truncation asked: the long prompt stays long
    assert len(long.input_ids) == 102

def test_truncation_keeps_eos_and_warns_once(tok):
    long = "a photo of a " + "very " * 90 + "small cat"
    with pytest.warns(UserWarning, match="truncated") as record:
        out = tok([long, long + " in a hat", "short"], padding="max_length", truncation=True)
    assert len(record) == 1 and "small cat" in str(record[0].message) and "in a hat" in str(record[0].message)
    assert all(len(i) == 77 and i[-1] == 49407 for i in out.input_ids) and out.input_ids[2][:3] == tok.encode("short")
    assert tok.encode(long, truncation=True, max_length=10) == tok.encode(long)[:9] + [49407]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tok("short prompt", padding="max_length", truncation=True)  # nothing dropped, no warning

def test_cache_gives_same_ids(tok):
    fresh = CLIPTokenizer.from_pretrained(MICRO_SD, subfolder='tokenizer')
    prompt = "an unusual zxqvword appears twice: zxqvword"
    assert fresh.encode(prompt) == fresh.encode(prompt) == tok.encode(prompt)
    assert 'zxqvword' in fresh.cache
    fresh.cache.update({f"filler{i}": [0] for i in range(MAX_CACHED_WORDS)})  # a full cache is emptied on a miss
    assert fresh.encode("a new qqzzword") == tok.encode("a new qqzzword")
    assert len(fresh.cache) <= 3 and 'qqzzword' in fresh.cache

# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('text', [3, None, b"a cat", ["a cat", 3], [["a cat"]], {"a": 1}])
def test_non_string_prompts(tok, text):
    with pytest.raises(TypeError, match="str"): tok(text)

def test_non_string_encode(tok):
    with pytest.raises(TypeError, match="must be a str"): tok.encode(42)

@pytest.mark.parametrize('kw, msg', [(dict(max_length=78), "model_max_length=77"),
                                     (dict(padding="max_length", max_length=1000), "model_max_length=77"),
                                     (dict(truncation=True, max_length=1), "between 2"),
                                     (dict(padding="max"), "padding must be one of"),
                                     (dict(return_tensors="np"), "return_tensors"),
                                     (dict(truncation="only_second"), "truncation must be True or False")])
def test_bad_arguments(tok, kw, msg):
    with pytest.raises(ValueError, match=msg): tok("a cat", **kw)

def test_empty_batch_and_ragged_tensors(tok):
    with pytest.raises(ValueError, match="empty"): tok([])
    with pytest.raises(ValueError, match="padding=True"): tok(["a", "a b"], return_tensors="pt")

@pytest.mark.parametrize('ids, err, msg', [([320, 49408], ValueError, "outside the vocabulary"),
                                           ([-1], ValueError, "outside the vocabulary"),
                                           ([320, 1.5], TypeError, "ints"), (["a"], TypeError, "ints")])
def test_decode_bad_ids(tok, ids, err, msg):
    with pytest.raises(err, match=msg): tok.decode(ids)
    with pytest.raises(err, match=msg): tok.batch_decode([[320], ids])

def test_missing_files(tok, folder, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="vocab.json"): CLIPTokenizer.from_pretrained(tmp_path)
    shutil.copy(folder/'vocab.json', tmp_path/'vocab.json')
    with pytest.raises(CheckpointNotFoundError, match="merges.txt"): CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="vocab.json"): CLIPTokenizer.from_pretrained(folder.parent, subfolder='nope')
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"): CLIPTokenizer.from_bpe_file(tmp_path/'nope.txt.gz')
    with pytest.raises(FileNotFoundError, match=BPE_FILE_NAME): find_bpe_file(packages=('surely_not_a_package_xyz',))

def test_special_token_not_in_vocab(tok):
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer(tok.encoder, tok.merges, pad_token="<pad>")
    with pytest.raises(TypeError, match="unknown arguments"): CLIPTokenizer(tok.encoder, tok.merges, mask_token="x")

# ---------------------------------------------------------------- slow / benchmark
@pytest.mark.slow
def test_every_assigned_code_point_matches_transformers(tok, hf):
    "Every character this Python's Unicode tables know (letters, digits, marks, symbols, spaces, private use)."
    chars = _assigned_chars()
    prompts = [f"a{c}b {c}{c} 1{c}Σ{c}" for c in chars]
    theirs = hf(prompts)['input_ids']
    bad = [c for c, p, t in zip(chars, prompts, theirs) if tok.encode(p) != t]
    print(f"\n{len(chars)} code points, {len(chars) - len(bad)} identical")
    assert not bad, [hex(ord(c)) for c in bad[:20]]

@pytest.mark.benchmark
def test_benchmark_batch_vs_transformers(hf, corpus):
    "Tokenise + pad a batch of prompts with a fresh tokenizer (cold cache), then again (warm cache)."
    prompts = corpus[:2000]
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ours_tok = CLIPTokenizer.from_pretrained(MICRO_SD, subfolder='tokenizer')
    def clock(f):
        t0 = time.perf_counter(); f(); return time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        cold = clock(lambda: ours_tok(prompts, **kw))
        warm = min(clock(lambda: ours_tok(prompts, **kw)) for _ in range(3))
    ref = min(clock(lambda: hf(prompts, **kw)) for _ in range(3))
    print(f"\n{len(prompts)} prompts: minidiff cold {cold*1e3:.0f} ms, warm {warm*1e3:.0f} ms; transformers "
          f"{ref*1e3:.0f} ms; ratio warm/transformers {warm/ref:.2f}, cold/transformers {cold/ref:.2f}")

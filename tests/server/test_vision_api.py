"""Images in chat requests (OpenAI's ``image_url`` parts) to a vision model, through the official ``openai`` client:
the answer equals the offline engine's on the same images (chat, streamed, the Responses API, the engine process), the
usage counts the image tokens, /tokenize matches, and every image a request cannot use is a 400 naming ``messages``
(network URLs, file:// outside --allowed-local-media-path, bad data, a text model, too many)."""

from __future__ import annotations

import base64
import io

import openai
import pytest

from loom import LLM, SamplingParams
from loom.entrypoints.openai.media import MediaError, content_format, decode_image, vision_content
from tests.engine.test_vision import image
from tests.server.conftest import start_llm_server, tiny_config


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is in this picture?"}


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory, smollm2_path):
    from loom.models.tiny import save_tiny_vision_model

    return save_tiny_vision_model(tmp_path_factory.mktemp("llava-clip"), smollm2_path, tower="clip")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    image(11).save(folder / "cat.png")
    return folder


@pytest.fixture(scope="module")
def vision_server(clip_llava, media_dir):
    server = start_llm_server(tiny_config(clip_llava, num_kv_blocks=256, allowed_local_media_path=str(media_dir)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vision_server):
    return openai.OpenAI(base_url=vision_server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def offline(clip_llava):
    return LLM(str(clip_llava), num_kv_blocks=128)


def expected(offline: LLM, img, n: int = 8) -> list[int]:
    messages = user(TEXT, {"type": "image_pil", "image_pil": img})
    return offline.chat(messages, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].outputs[0].token_ids


def test_chat_answer_equals_the_offline_engine(client, offline):
    img = image(21)
    want = offline.tokenizer.decode(expected(offline, img), skip_special_tokens=True)
    out = client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(data_url(img))), max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want
    prompt = offline.apply_chat_template(user(TEXT, {"type": "image"}))
    assert out.usage.prompt_tokens == len(prompt) - 1 + 16  # the placeholder becomes the image's 16 rows
    other = client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(data_url(image(22)))),
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != want  # the image decides the answer, not the cached prompt text


def test_stream_and_jpeg(client, offline):
    img = image(23)
    jpeg = data_url(img, "JPEG")
    seen = decode_image(base64.b64decode(jpeg.split(",", 1)[1]))  # what the server decodes from the JPEG
    want = offline.tokenizer.decode(expected(offline, seen), skip_special_tokens=True)
    stream = client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(jpeg)), max_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_file_urls_under_the_allowed_folder(client, offline, media_dir):
    from PIL import Image

    want = offline.tokenizer.decode(expected(offline, Image.open(media_dir / "cat.png").convert("RGB")),
                                    skip_special_tokens=True)
    out = client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(f"file://{media_dir}/cat.png")),
                                         max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want


def test_responses_api_takes_the_same_images(client, offline):
    img = image(24)
    want = offline.tokenizer.decode(expected(offline, img), skip_special_tokens=True)
    out = client.responses.create(model="tiny", max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True},
                                  input=[{"role": "user", "content": [
                                      {"type": "input_text", "text": TEXT["text"]},
                                      {"type": "input_image", "image_url": data_url(img)}]}])
    assert out.output_text == want


def test_tokenize_counts_image_tokens(vision_server, offline):
    import httpx

    body = {"model": "tiny", "messages": user(TEXT, image_part(data_url(image(1))))}
    got = httpx.post(vision_server.url + "/tokenize", json=body).json()
    prompt = offline.apply_chat_template(user(TEXT, {"type": "image"}))
    assert got["count"] == len(prompt) + 15
    assert got["tokens"].count(offline.engine.image_tokens.token_id) == 16


@pytest.mark.parametrize("parts, needle", [
    ([image_part("https://example.com/cat.png")], "does not fetch"),
    ([image_part("file:///etc/passwd")], "must be under"),
    ([image_part("data:image/png;base64,@@@")], "not valid base64"),
    ([image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode())], "could not be decoded"),
    ([image_part("data:image/png,rawbytes")], "must be base64"),
    ([image_part(data_url(image(1)))] * 5, "at most 4"),
])
def test_bad_images_are_400(client, parts, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=user(TEXT, *parts), max_tokens=2)
    assert needle in err.value.body["message"]
    assert err.value.body["param"] == "messages"


def test_images_only_in_user_messages(client):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image_part(data_url(image(1)))]}]
    with pytest.raises(openai.BadRequestError, match="user messages"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)


def test_engine_process_carries_the_images(clip_llava, offline):
    img = image(25)
    want = offline.tokenizer.decode(expected(offline, img), skip_special_tokens=True)
    server = start_llm_server(tiny_config(clip_llava, num_kv_blocks=128, engine_process=True))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(data_url(img))),
                                             max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].message.content == want
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["anyres", "onevision"])
def test_anyres_counts_each_picture_by_its_size(tmp_path, smollm2_path, kind):
    """AnyRes (LLaVA-NeXT, LLaVA-OneVision): a picture's tokens depend on its size (and, for OneVision, on how many
    pictures the prompt has); the server expands each placeholder by it (usage, /tokenize) and answers as the offline
    engine does."""
    import httpx

    from loom.models.tiny import save_tiny_vision_model

    path = save_tiny_vision_model(tmp_path / kind, smollm2_path, **{kind: True})
    offline = LLM(str(path), num_kv_blocks=128)
    wide, tall = image(31, (20, 100)), image(32, (90, 30))
    messages = user(TEXT, {"type": "image_pil", "image_pil": wide}, {"type": "image_pil", "image_pil": tall})
    want = offline.chat(messages, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tokens = offline.engine.image_tokens
    assert tokens.count(100, 20) != tokens.count(30, 90)  # alone, each its own grid
    server = start_llm_server(tiny_config(path, num_kv_blocks=128))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        parts = [image_part(data_url(wide)), image_part(data_url(tall))]
        out = client.chat.completions.create(model="tiny", messages=user(TEXT, *parts), max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert out.choices[0].message.content == offline.tokenizer.decode(want.outputs[0].token_ids,
                                                                           skip_special_tokens=True)
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)
        body = {"model": "tiny", "messages": user(TEXT, *parts)}
        assert httpx.post(server.url + "/tokenize", json=body).json()["tokens"] == want.prompt_token_ids
    finally:
        server.stop()


def test_text_model_refuses_images(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="text model"):
        client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(data_url(image(1)))),
                                       max_tokens=2)


def test_decode_image_limits():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buf, format="PNG")  # small when compressed, 20 M pixels decoded
    with pytest.raises(MediaError, match="pixels"):
        decode_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")  # a format Pillow opens, not one a request may reach
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(buf.getvalue())


def _broken_png() -> bytes:
    """A PNG of random pixels whose image data chunk claims half its length (Pillow raises SyntaxError on it)."""
    buf = io.BytesIO()
    image(3, (32, 32)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") - 4
    length = int.from_bytes(data[at : at + 4], "big")
    data[at : at + 4] = (length // 2).to_bytes(4, "big")
    return bytes(data)


def test_decode_image_refuses_thin_and_broken_images():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2048, 1)).save(buf, format="PNG")  # a short side scaled to 336 would make it 688,128 wide
    with pytest.raises(MediaError, match="8:1"):
        decode_image(buf.getvalue())
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(_broken_png())


def test_file_urls(media_dir, tmp_path):
    from loom.entrypoints.openai.media import load_image

    (media_dir / "my cat.png").write_bytes((media_dir / "cat.png").read_bytes())
    assert load_image(f"file://{media_dir}/my%20cat.png", media_dir).size == (50, 40)
    assert load_image(f"file://localhost{media_dir}/cat.png", media_dir).size == (50, 40)
    outside = tmp_path / "secret.png"
    outside.write_bytes((media_dir / "cat.png").read_bytes())
    link = media_dir / "link.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    loop = media_dir / "loop.png"
    loop.unlink(missing_ok=True)
    loop.symlink_to(loop)
    for url, needle in [(f"file://{link}", "must be under"),  # a link out of the folder: resolved, refused
                        (f"file://{media_dir}/../{outside.parent.name}/secret.png", "must be under"),
                        (f"file://{media_dir}/missing.png", "could not be read"),
                        (f"file://{media_dir}/{'a' * 300}.png", "could not be read"),
                        (f"file://{loop}", "could not be read"),
                        (f"file://{media_dir}", "could not be read"),  # a folder
                        (f"file://evil.example.com{media_dir}/cat.png", "absolute path"),
                        ("file://cat.png", "absolute path")]:
        with pytest.raises(MediaError, match=needle):
            load_image(url, media_dir)


def test_broken_image_is_400_not_500(client):
    url = "data:image/png;base64," + base64.b64encode(_broken_png()).decode()
    with pytest.raises(openai.BadRequestError, match="could not be decoded"):
        client.chat.completions.create(model="tiny", messages=user(TEXT, image_part(url)), max_tokens=2)


def test_content_shapes():
    assert content_format("{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}") == "openai"
    assert content_format("{{ message['content'] }}") == "string"
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}]}]
    assert vision_content(messages, "openai", "<image>") == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    assert vision_content(messages, "string", "<image>") == [
        messages[0], {"role": "user", "content": "<image>\nLook: "}]


def test_chat_template_content_format_flag(clip_llava):
    """vLLM's --chat-template-content-format: "string" hands llava's parts-looping template plain text, which then
    places no image (a 400 that says so); "auto" reads the template and hands it parts."""
    import asyncio
    from types import SimpleNamespace

    from loom.entrypoints.openai.errors import OpenAIError
    from loom.entrypoints.openai.protocol import ChatMessage
    from loom.entrypoints.openai.serving import ServingContext
    from loom.models.loader import load_tokenizer
    from loom.models.vision import ImageTokens

    tokenizer = load_tokenizer(clip_llava)
    front = SimpleNamespace(tokenizer=tokenizer, max_model_len=4096,
                            image_tokens=ImageTokens(tokenizer.convert_tokens_to_ids("<image>"), 16))
    messages = [ChatMessage(**m) for m in user(TEXT, image_part(data_url(image(1))))]
    auto = ServingContext(front, ["m"])
    ids = asyncio.run(auto.apply_chat_template(messages, images=[image(1)]))
    assert ids.count(front.image_tokens.token_id) == 16
    forced = ServingContext(front, ["m"], chat_template_content_format="string")
    with pytest.raises(OpenAIError, match="placed 0 image tokens"):
        asyncio.run(forced.apply_chat_template(messages, images=[image(1)]))
    auto.close()
    forced.close()


def test_responses_conversation_keeps_its_image(client, offline):
    """previous_response_id carries the first turn's picture: the second turn's prompt holds it again (and its
    blocks come from the prefix cache)."""
    first = client.responses.create(model="tiny", max_output_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                    input=[{"role": "user", "content": [
                                        {"type": "input_text", "text": TEXT["text"]},
                                        {"type": "input_image", "image_url": data_url(image(41))}]}])
    second = client.responses.create(model="tiny", max_output_tokens=4, temperature=0, previous_response_id=first.id,
                                     input="And its colours?", extra_body={"ignore_eos": True})
    assert second.status == "incomplete"  # cut at max_output_tokens, as asked
    assert second.usage.input_tokens > first.usage.input_tokens > 16  # the image's 16 tokens are in both
    assert second.usage.input_tokens_details.cached_tokens >= 16



@pytest.mark.parametrize("kind", ["qwen2-vl", "idefics3", "gemma3", "mistral3"])
def test_resolution_models_chat_tokenize_and_usage(tmp_path, smollm2_path, kind):
    """Qwen2-VL (a picture's tokens follow its size, one per merged patch), Idefics3 / SmolVLM (a placeholder
    becomes the picture's tiles with their tags: a token sequence, not one token repeated) and Gemma 3 (its
    ``<start_of_image>`` becomes markers, newlines merged with the prompt's, and image tokens attended both ways),
    Mistral 3 (a picture's lines of [IMG] closed by [IMG_BREAK], its size deciding): the server's media threads
    prepare the pictures, the template puts them where the parts stand, and the answer, usage and /tokenize equal the
    offline engine's."""
    import httpx

    from loom.models.tiny import save_tiny_gemma3_vision, save_tiny_idefics3, save_tiny_mistral3, save_tiny_qwen_vl

    save = {"qwen2-vl": save_tiny_qwen_vl, "idefics3": save_tiny_idefics3, "gemma3": save_tiny_gemma3_vision,
            "mistral3": save_tiny_mistral3}[kind]
    path = save(tmp_path / kind, smollm2_path)
    # Qwen2-VL: pictures bounded by --mm-processor-kwargs, on the server's media threads as in the engine
    resize = {"mm_processor_kwargs": {"max_pixels": 48 * 64}} if kind == "qwen2-vl" else {}
    offline = LLM(str(path), num_kv_blocks=128, **resize)
    wide, tall = image(41, (30, 110)), image(42, (80, 40))
    and_part = {"type": "text", "text": "and"}
    messages = user({"type": "image_pil", "image_pil": wide}, TEXT, and_part, {"type": "image_pil", "image_pil": tall})
    want = offline.chat(messages, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tokens = offline.engine.image_tokens
    assert want.prompt_token_ids.count(tokens.token_id) == tokens.count(110, 30) + tokens.count(40, 80)
    server = start_llm_server(tiny_config(path, num_kv_blocks=128, **resize))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        parts = [image_part(data_url(wide)), TEXT, and_part, image_part(data_url(tall))]
        out = client.chat.completions.create(model="tiny", messages=user(*parts), max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert out.choices[0].message.content == offline.tokenizer.decode(want.outputs[0].token_ids,
                                                                           skip_special_tokens=True)
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)
        body = {"model": "tiny", "messages": user(*parts)}
        assert httpx.post(server.url + "/tokenize", json=body).json()["tokens"] == want.prompt_token_ids
    finally:
        server.stop()

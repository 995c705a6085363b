"""The default backbone really is ImageNet-pretrained, offline, from the wheel."""
import pytest
import torch
from PIL import Image

from ovr.embedding.backbones import load_backbone


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def _logits(bb, img):
    import timm
    from ovr.embedding.backbones import lite0_from_wheel_state_dict
    from ovr.embedding.identity import lite0_file as _lite0_file

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full.load_state_dict(lite0_from_wheel_state_dict(torch.load(_lite0_file(), weights_only=True), full))
    full.eval()
    with torch.inference_mode():
        return full, full(bb.transform(img)[None])


def test_coffee_is_espresso(lite0):
    skdata = pytest.importorskip("skimage.data")
    full, logits = _logits(lite0, Image.fromarray(skdata.coffee()))
    assert int(logits.argmax()) == 967  # ImageNet "espresso"
    assert float(logits.softmax(-1).max()) > 0.5
    # the frozen feature extractor is that network minus its classifier
    with torch.inference_mode():
        feat = lite0.model(lite0.transform(Image.fromarray(skdata.coffee()))[None])
        assert torch.allclose(full.get_classifier()(feat), logits, atol=1e-4)


def test_logits_match_the_original_architecture(lite0):
    efl = pytest.importorskip("efficientnet_lite_pytorch")
    from ovr.embedding.identity import lite0_file as _lite0_file

    orig = efl.EfficientNet.from_name("efficientnet-lite0")
    orig.load_state_dict(torch.load(_lite0_file(), weights_only=True))
    orig.eval()
    img = Image.fromarray(pytest.importorskip("skimage.data").chelsea())
    full, ours = _logits(lite0, img)
    with torch.inference_mode():
        theirs = orig(lite0.transform(img)[None])
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert int(ours.argmax()) in (281, 282, 285)  # tabby / tiger cat / Egyptian cat


def test_preprocessing_is_the_weights_own(lite0):
    p = lite0.preprocess
    assert "bicubic" in p.lower() and "224" in p and "0.5" in p

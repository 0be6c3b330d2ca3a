import pytest

from clinicalblip.prompts import TemplateError, available_templates, load_template, render, template_from_dict

FULL = {"indication": "Shortness of breath.", "history": "Smoker.", "comparison": "None.", "views": ["PA", "LATERAL"]}


def test_findings_with_context_full_context_pinned():
    r = render(load_template("findings_with_context"), FULL)
    assert r.prompt == (
        "Indication: Shortness of breath.\nHistory: Smoker.\nComparison: None.\nViews: PA, LATERAL\n"
        "Write the findings of this chest radiograph."
    )
    assert r.qformer_prompt == r.prompt  # InstructBLIP feeds one instruction to both


def test_findings_with_context_partial_context_drops_empty_lines():
    r = render(load_template("findings_with_context"), {"indication": "  Chest pain. ", "history": None, "views": []})
    assert r.prompt == "Indication: Chest pain.\nWrite the findings of this chest radiograph."


def test_findings_with_context_empty_context():
    assert render(load_template("findings_with_context"), {}).prompt == "Write the findings of this chest radiograph."


def test_no_context_template_ignores_context():
    assert render(load_template("findings_no_context"), FULL).prompt == "Write the findings of this chest radiograph."


def test_unknown_template_lists_available():
    with pytest.raises(TemplateError) as e:
        load_template("does_not_exist")
    for name in available_templates():
        assert name in str(e.value)


def test_unknown_slot_in_context_is_an_error():
    with pytest.raises(TemplateError, match="unknown slot 'indicaton'"):
        render(load_template("findings_with_context"), {"indicaton": "typo"})


def test_template_with_unknown_slot_rejected():
    with pytest.raises(TemplateError, match="unknown slot"):
        template_from_dict({"name": "x", "prompt": "Hello {patient_name}", "slots": ["patient_name"]})


def test_template_with_undeclared_slot_rejected():
    with pytest.raises(TemplateError, match="not declared"):
        template_from_dict({"name": "x", "prompt": "Indication: {indication}", "slots": []})


def test_separate_qformer_instruction():
    t = template_from_dict({"name": "x", "prompt": "Indication: {indication}\nReport:", "qformer": "Describe the image.",
                            "slots": ["indication"]})
    r = render(t, {"indication": "Fever."})
    assert r.prompt == "Indication: Fever.\nReport:" and r.qformer_prompt == "Describe the image."


ALL = {"indication": "Cough.", "history": "Smoker.", "comparison": "2019.", "views": ["PA", "LATERAL"], "age": 67,
       "sex": "F", "hints": ["effusion", "pneumothorax"]}
CTX_BLOCK = "Indication: Cough.\nHistory: Smoker.\nComparison: 2019.\nViews: PA, LATERAL\nAge: 67\nSex: F\n" \
            "Suspected: effusion, pneumothorax\n"


@pytest.mark.parametrize("name,instruction", [
    ("findings", "Write the findings of this chest radiograph."),
    ("impression", "Write the impression of this chest radiograph."),
    ("findings_impression", "Write the findings and impression of this chest radiograph."),
])
def test_every_template_pinned(name, instruction):
    with_ctx, no_ctx = load_template(f"{name}_with_context"), load_template(f"{name}_no_context")
    assert render(with_ctx, ALL).prompt == CTX_BLOCK + instruction  # full context
    assert render(with_ctx, {"indication": "Cough.", "sex": "F"}).prompt == \
        f"Indication: Cough.\nSex: F\n{instruction}"  # partial
    assert render(with_ctx, {}).prompt == instruction  # empty
    for ctx in (ALL, {}):
        assert render(no_ctx, ctx).prompt == instruction
    assert with_ctx.target == no_ctx.target == name


def test_readme_describes_every_template():
    from clinicalblip.prompts import prompts_dir

    readme = (prompts_dir() / "README.md").read_text()
    for name in available_templates():
        assert f"`{name}`" in readme

from training.results import merge_sections

EXISTING = "# Results\n\nintro\n\n## Grid\n\nold grid\n\n## Style\n\nold style\n\n## Image-to-image\n\nold i2i\n"


def test_a_partial_rebuild_replaces_its_sections_in_place_and_keeps_the_others():
    merged = merge_sections(EXISTING, [["## Style", "", "new style", ""]])
    assert merged == EXISTING.replace("old style", "new style")


def test_a_section_the_file_lacks_is_appended():
    merged = merge_sections(EXISTING, [["## Digits", "", "digits", ""]])
    assert merged.startswith(EXISTING) and merged.endswith("## Digits\n\ndigits\n\n")

from agent.generation import StopStringFilter


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str, bool]:
    f = StopStringFilter(stops)
    emitted = ""
    for piece in pieces:
        out, hit = f.feed(piece)
        emitted += out
        if hit:
            return emitted, f.text, True
    emitted += f.finish()
    return emitted, f.text, False


def test_no_stop_strings_passes_text_through() -> None:
    assert feed_all([], ["Hel", "lo"]) == ("Hello", "Hello", False)


def test_stop_inside_one_piece_truncates_before_it() -> None:
    assert feed_all(["END"], ["abc END def"]) == ("abc ", "abc ", True)


def test_stop_split_across_pieces_is_never_emitted() -> None:
    f = StopStringFilter(["\n\n"])
    out1, hit1 = f.feed("Paris.\n")
    assert (out1, hit1) == ("Paris.", False)  # the "\n" is held back: it may start the stop
    out2, hit2 = f.feed("\nMore")
    assert (out2, hit2) == ("", True)
    assert f.text == "Paris."


def test_held_back_prefix_is_released_when_it_does_not_match() -> None:
    emitted, text, hit = feed_all(["STOP"], ["ST", "AR", "T"])
    assert (emitted, text, hit) == ("START", "START", False)


def test_earliest_of_several_stop_strings_wins() -> None:
    emitted, text, hit = feed_all(["world", "lo w"], ["hello world"])
    assert (emitted, text, hit) == ("hel", "hel", True)


def test_emitted_pieces_always_concatenate_to_the_final_text() -> None:
    text = "one, two; three. four! five"
    for stops in (["."], [";", "!"], ["xyz"], ["thr"], ["e"]):
        for size in (1, 2, 3, 5):
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            emitted, final, _ = feed_all(stops, pieces)
            assert emitted == final

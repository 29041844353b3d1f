"""Answer / ground-truth pairs with their expected verdicts (1 = correct)."""

CASES = [
    # plain numbers
    ("The answer is 42.", "42", 1), ("\\boxed{42}", "42", 1), ("\\boxed{41}", "42", 0), ("\\boxed{42.0}", "42", 1),
    ("\\boxed{-3}", "-3", 1), ("\\boxed{3}", "-3", 0), ("\\boxed{1,000}", "1000", 1), ("\\boxed{0.5}", "1/2", 1),
    ("\\boxed{0.25}", "\\frac{1}{4}", 1), ("\\boxed{0.3333333}", "\\frac{1}{3}", 1), ("\\boxed{0.33}", "\\frac{1}{3}", 0),
    ("\\boxed{3.14159}", "3.14159", 1), ("\\boxed{2.5}", "2.50", 1), ("\\boxed{1e3}", "1000", 1),
    ("\\boxed{7}", "7.0", 1), ("\\boxed{12}", "21", 0), ("\\boxed{0}", "0", 1), ("\\boxed{-0.5}", "-\\frac{1}{2}", 1),
    # fractions and LaTeX
    ("\\boxed{\\frac{3}{4}}", "0.75", 1), ("\\boxed{\\dfrac{3}{4}}", "3/4", 1), ("\\boxed{\\tfrac{2}{6}}", "1/3", 1),
    ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", 1), ("\\boxed{\\frac{3}{5}}", "\\frac{3}{4}", 0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1), ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0),
    ("\\boxed{\\pi}", "\\pi", 1), ("\\boxed{2\\pi}", "2\\pi", 1), ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1),
    ("\\boxed{\\pi}", "3.14", 0), ("\\boxed{x^2+2x+1}", "(x+1)^2", 1), ("\\boxed{x^2+1}", "(x+1)^2", 0),
    ("\\boxed{2x}", "x+x", 1), ("\\boxed{\\frac{1}{2}x}", "x/2", 1), ("\\boxed{e^{2}}", "e^2", 1),
    ("\\boxed{\\log_2 8}", "3", 1), ("\\boxed{10^{-2}}", "0.01", 1), ("\\boxed{2^{10}}", "1024", 1),
    ("\\boxed{\\sin^2 x + \\cos^2 x}", "1", 1), ("\\boxed{a+b}", "b+a", 1), ("\\boxed{a-b}", "b-a", 0),
    # units and percentages
    ("\\boxed{5\\text{ cm}}", "5", 1), ("\\boxed{12 \\mathrm{m}}", "12", 1), ("\\boxed{30^\\circ}", "30", 1),
    ("\\boxed{45^{\\circ}}", "45", 1), ("\\boxed{50\\%}", "50", 1), ("\\boxed{\\$20}", "20", 1),
    ("\\boxed{7 \\text{ apples}}", "7", 1), ("\\boxed{8\\text{ cm}}", "5", 0), ("\\boxed{100\\,\\text{km}}", "100", 1),
    # intervals, sets, tuples
    ("\\boxed{(1, 2)}", "(1,2)", 1), ("\\boxed{[0, 1]}", "[0,1]", 1), ("\\boxed{(0, 1]}", "(0,1]", 1),
    ("\\boxed{[0, 1)}", "[0,1]", 0), ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1), ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", 1),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", 0), ("\\boxed{x \\in [2, 5]}", "[2,5]", 1), ("\\boxed{(2,3)}", "(3,2)", 0),
    # equations
    ("\\boxed{x = 5}", "5", 1), ("\\boxed{x=5}", "x=5", 1), ("\\boxed{y = 2x + 1}", "y=2x+1", 1), ("\\boxed{x = 4}", "5", 0),
    # phrasing without a box
    ("So the final answer is 17.", "17", 1), ("Final answer: 3/4", "0.75", 1), ("Answer: 12", "12", 1),
    ("The answer is \\(\\frac{1}{2}\\).", "0.5", 1), ("I think it's 9.\nThe answer is 8", "8", 1),
    ("There are 3 red circles.\n3", "3", 1), ("The answer is 5 apples.", "5", 1), ("The answer is seven", "7", 0),
    # thinking blocks: only the part after </think> counts
    ("<think>maybe \\boxed{2}</think>\\boxed{3}", "3", 1), ("<think>\\boxed{3}</think>\\boxed{2}", "3", 0),
    ("hmm 2+2</think>The answer is 4<|im_end|>", "4", 1), ("reasoning</think>\n\n\\boxed{10}", "10", 1),
    # nested braces in the box
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1), ("\\boxed{{5}}", "5", 1), ("\\boxed{\\left(1,2\\right)}", "(1,2)", 1),
    # multiple choice
    ("\\boxed{B}", "B", 1), ("\\boxed{(C)}", "C", 1), ("The answer is B.", "B", 1), ("Answer: (D)", "D", 1),
    ("I choose option A", "A", 1), ("\\boxed{A}", "B", 0), ("B. the blue square", "B", 1), ("(A) is wrong, so (B)", "B", 1),
    ("the red circle", "A", 1), ("the blue square", "A", 0), ("</think>C", "C", 1), ("\\boxed{E}", "E", 0),
    # malformed output
    ("", "5", 0), ("<think>I don't know", "5", 0), ("\\boxed{", "5", 0), ("\\boxed{}", "5", 0),
    ("!!!???", "5", 0), ("\\boxed{\\frac{1}{}}", "0.5", 0), ("The answer is", "3", 0), ("<|im_end|>", "1", 0),
    ("\\boxed{5", "5", 0), ("}}}{{{", "2", 0), ("\\boxed{NaN}", "2", 0), ("\\boxed{\\infty}", "3", 0),
]

# choices for the multiple-choice rows (by gold letter, the answer being the letter's index)
CHOICES = ["the red circle", "the blue square", "the green triangle", "the yellow circle"]

# multiple-choice forms (choices = CHOICES, A-D): completion -> the letter extract_choice reads
# (None: no letter). The precedence is extract_choice's docstring: region, last box, "the
# answer is ...", last set-off letter, a choice's text.
CHOICE_CASES = [
    # the last box decides, LaTeX text wrappers unwrapped, option text after the letter allowed
    ("\\boxed{B}", "B"), ("\\boxed{(C)}", "C"), ("\\boxed{\\text{B}}", "B"), ("\\boxed{\\mathrm{C}}", "C"),
    ("\\boxed{\\textbf{D}}", "D"), ("\\boxed{\\text{(A)}}", "A"), ("$\\boxed{\\mathbf{(A)}}$", "A"),
    ("\\boxed{B. the blue square}", "B"), ("\\boxed{\\text{B. the blue square}}", "B"),
    ("\\boxed{(C) the green triangle}", "C"), ("\\boxed{D: the yellow circle}", "D"),
    ("\\boxed{\\text{(B)}\\ \\text{blue square}}", "B"), ("\\boxed{\\text{Option } C}", "C"),
    ("\\boxed{the blue square}", "B"), ("\\boxed{\\text{the green triangle}}", "C"), ("\\boxed{b}", "B"),
    ("(A) looks right at first, but \\boxed{C}", "C"), ("\\boxed{A} hmm, no: \\boxed{D}", "D"),
    ("\\boxed{E}", None), ("Options (A) and (B) are wrong. \\boxed{7}", None), ("\\boxed{}", None),
    # "the answer is ..."
    ("The answer is B.", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"), ("Final answer: **A**", "A"),
    ("**Final Answer:** (C)", "C"), ("**Answer: C**", "C"), ("The correct option is B, the blue square.", "B"),
    ("The correct answer is the green triangle.", "C"), ("I choose option A", "A"),
    ("Option A is tempting. However the answer is (C)", "C"), ("The answer is $\\text{B}$", "B"),
    ("Answer: the yellow circle", "D"), ("Answer: b", "B"), ("The answer is a red circle", None),
    ("The answer is C because the triangle is green.", "C"),
    # the last set-off letter
    ("**B**", "B"), ("**(D)**", "D"), ("Option A seems plausible, but on reflection (C)", "C"),
    ("(A) is wrong, so (B)", "B"), ("B. the blue square", "B"), ("C) the green triangle", "C"),
    ("It must be [D]", "D"), ("Looking at the image carefully.\nB", "B"), ("</think>C", "C"),
    ("I think A red circle is not it, so (D)", "D"), ("A red circle and a blue square. Choice D", "D"),
    ("$\\text{C}$", "C"), ("I think it is hard to say.", None),
    # the region: after the last </think>, from the last "final answer" on
    ("<think>The answer is A</think>The answer is B", "B"), ("<think>\\boxed{A}</think>(B)", "B"),
    ("Final Answer\n\nD", "D"), ("First, (A) and (B) differ in colour. Final answer: C", "C"),
    ("\\boxed{A}\n\nFinal answer: (B)", "B"),
    # a choice's text
    ("the red circle", "A"), ("It is the blue square", "B"), ("", None), ("!!!", None),
]

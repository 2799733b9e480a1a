"""The sample corpus: scenes mmpipe draws itself (corpus.py: the images, captions and attribute columns)
and the questions its attribute columns answer (questions.py). The library reads these only through the
instruction interface (data/instruct.py) and the suites that declare the corpus's columns."""

"""`kiln chat`'s sampling defaults, in a module that loads no torch, so the command line's options can
show them without it.

Cooler than `kiln sample` (temperature 0.8, top-k 200): a chat answer should stay on the question, so
temperature 0.6 and top-p 0.9 as Meta ships Llama 3's chat models, with transformers' top-k 50. And in
words the model has read, when it keeps them (kiln.generate.known_words): a small model makes words up.
"""

CHAT_SAMPLING = {"max_new_tokens": 200, "temperature": 0.6, "top_k": 50, "top_p": 0.9, "known_words": True}

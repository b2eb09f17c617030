"""The word list synthetic prompts are drawn from.

Common English words that real BPE tokenizers keep as single tokens, so a prompt of n
words is close to n tokens on any model. Drawing words at random (instead of S-LoRA's
"Hello " * n) keeps prompts distinct, so vLLM's prefix cache cannot turn the benchmark
into a cache-hit benchmark.
"""

PROMPT_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at
which but have an they you were her she there one all we their been has when who will
more no if out so said what up its about into than them can only other new some could
time these two may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see
men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three
small large house water city name point line light place part number high every found
garden read write story book music table chair door window road river tree green blue
red white black open close start end early late morning night summer winter market
school family friend money power field paper study simple clear ready happy
""".split()

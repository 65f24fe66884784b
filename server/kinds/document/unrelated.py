"""Text that no registered document contains, for `unrelated_ppl_ratio`: everyday prose on
common subjects, written for memserve, so that a bank's damage to other text is measured on
text the model reads well without any memory."""

UNRELATED_TEXT = (
    "Bread is one of the oldest prepared foods. A simple loaf needs only flour, water, salt and "
    "yeast. The dough is kneaded until it becomes smooth and elastic, then left to rise in a warm "
    "place for an hour or two. During that time the yeast feeds on the sugars in the flour and "
    "releases carbon dioxide, which fills the dough with small bubbles. After shaping, the loaf "
    "rises again and is baked in a hot oven until the crust turns golden brown. Many bakers "
    "place a tray of water in the oven to create steam, which helps the crust stay thin and crisp.\n"
    "Walking is a gentle form of exercise that most people can enjoy. Regular walks strengthen "
    "the heart, improve balance and help with sleep. Doctors often suggest about thirty minutes a "
    "day, at a pace that makes breathing a little faster while still allowing conversation. "
    "Comfortable shoes, a bottle of water and a route with some shade make a long walk easier in "
    "summer.\n"
    "A computer keeps its working data in memory and its files on a disk. When a program starts, "
    "the operating system loads it from the disk into memory, where the processor can read its "
    "instructions quickly. Saving a document copies it back to the disk, so that it is not lost "
    "when the computer is switched off. Backups on a second drive protect against a failure of "
    "the first.\n"
    "Rain forms when water vapour in the air cools and condenses into droplets around tiny "
    "particles of dust. The droplets join together inside clouds until they are heavy enough to "
    "fall. In cold weather they freeze on the way down and reach the ground as snow or sleet."
)

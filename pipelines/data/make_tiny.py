"""Generate `tiny.jsonl`: the bundled dataset of the `tiny` preset (`make demo`, the end-to-end test).

Word-sense retrieval: each query names an ambiguous word and an aspect ("jaguar diet"); the positive answers it
for the intended sense without repeating the word ("The big spotted cat of the Amazon hunts capybaras ..."),
and the hard negatives are facts about the word's other sense that do repeat it ("The Jaguar F-Type is powered
by ..."). Word overlap points at the wrong document, so an off-the-shelf model like all-MiniLM-L6-v2 gets
some of these wrong and a short fine-tune has something to learn. Canonical ms-swift rows:
`{"query", "response", "rejected_response": [...]}`.

Deterministic: `python pipelines/data/make_tiny.py` rewrites the same file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# word -> two senses; each sense: (aspect, fact) pairs. The first sense's facts avoid the word itself.
SENSES = {
    "jaguar": [
        [
            ("diet", "The big spotted cat of the Amazon hunts capybaras, turtles and caimans."),
            ("habitat", "This wild feline lives in rainforests and swamps from Mexico to Argentina."),
            ("bite", "Its jaws are strong enough to crack a turtle shell with a single bite."),
            ("swimming", "Unlike most cats it likes water and swims across wide rivers to hunt."),
            ("young", "A mother raises two cubs in a hidden den and teaches them to hunt."),
        ],
        [
            ("engine", "The Jaguar F-Type is powered by a supercharged five-litre V8 engine."),
            ("price", "A new Jaguar sedan costs around sixty thousand dollars at the dealer."),
            ("factory", "Jaguar cars are assembled in plants in the English Midlands."),
            ("electric", "The Jaguar I-Pace was the brand's first fully electric SUV."),
            ("logo", "The Jaguar badge on the bonnet shows a leaping chrome figure."),
        ],
    ],
    "python": [
        [
            ("diet", "The large constrictor squeezes rodents and birds, then swallows them whole."),
            ("habitat", "These heavy-bodied snakes live in the forests and grasslands of Africa and Asia."),
            ("size", "The reticulated species can grow longer than six metres."),
            ("eggs", "The female coils around her clutch and shivers her muscles to keep it warm."),
            ("venom", "It has no venom; it kills prey by coiling around it until it stops breathing."),
        ],
        [
            ("syntax", "Python code uses indentation instead of braces to mark blocks."),
            ("creator", "Python was created by Guido van Rossum and first released in 1991."),
            ("packages", "Python libraries are installed from the package index with pip."),
            ("speed", "Python is interpreted, so tight loops run slower than in compiled languages."),
            ("types", "Python is dynamically typed but accepts optional type hints."),
        ],
    ],
    "apple": [
        [
            ("vitamins", "The crunchy orchard fruit is a good source of fibre and vitamin C."),
            ("harvest", "Growers pick the ripe fruit from the trees in early autumn."),
            ("varieties", "Granny Smith is green and tart while Gala is sweet and red."),
            ("pie", "Slice the fruit thinly, add cinnamon and sugar, and bake it in a buttery crust."),
            ("storage", "Kept in a cool cellar the fruit stays crisp for months."),
        ],
        [
            ("founder", "Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne in 1976."),
            ("phone", "Apple released the first iPhone in 2007."),
            ("headquarters", "Apple's headquarters is a ring-shaped campus in Cupertino, California."),
            ("laptop", "Apple sells the MacBook Air and MacBook Pro laptops."),
            ("stock", "Apple shares trade on the Nasdaq under the ticker AAPL."),
        ],
    ],
    "mercury": [
        [
            ("orbit", "The innermost planet circles the Sun once every 88 days."),
            (
                "temperature",
                "The closest world to the Sun swings from 430 degrees by day to minus 180 at night.",
            ),
            ("moons", "The smallest planet of the solar system has no moons at all."),
            ("surface", "Its grey surface is covered with craters, much like our Moon."),
            ("probe", "NASA's MESSENGER spacecraft orbited the first planet from 2011 to 2015."),
        ],
        [
            ("toxicity", "Mercury vapour is poisonous and damages the nervous system."),
            ("thermometer", "Old thermometers held a thread of liquid mercury that expands with heat."),
            ("symbol", "Mercury is a chemical element with the symbol Hg and atomic number 80."),
            ("fish", "Large tuna can contain traces of mercury from polluted seas."),
            ("state", "Mercury is the only metal that is liquid at room temperature."),
        ],
    ],
    "bass": [
        [
            ("bait", "Anglers catch the freshwater game fish with plastic worms and crankbaits."),
            ("habitat", "Largemouths hide near weeds and fallen logs in warm lakes."),
            ("size", "A trophy largemouth from a lake can weigh more than ten pounds."),
            ("cooking", "The white, flaky fillets are good pan-fried with lemon."),
            ("spawning", "In spring the males fan out nests in the shallows and guard the eggs."),
        ],
        [
            ("strings", "A standard bass guitar has four strings tuned E, A, D, G."),
            ("amplifier", "Bass players use a bass amp with a large speaker cabinet for low frequencies."),
            ("band", "In a band the bass locks in with the drums to hold the groove."),
            ("frets", "A fretless bass gives a smooth, singing tone with slides between notes."),
            ("clef", "Low notes for the double bass are written in the bass clef."),
        ],
    ],
    "crane": [
        [
            ("migration", "The tall wading birds fly thousands of kilometres south in long V formations."),
            ("dance", "Pairs leap, bow and call to each other in courtship displays."),
            ("diet", "These long-legged birds eat frogs, insects and grain in wetlands."),
            ("nest", "The pair builds a mound of reeds in a marsh and lays two eggs."),
            ("lifespan", "The grey wetland birds can live for more than twenty years in the wild."),
        ],
        [
            ("construction", "A tower crane lifts steel beams to the top floors of a building site."),
            ("operator", "A crane operator needs a licence and sits in a cab high above the ground."),
            ("capacity", "Mobile cranes are rated by how many tonnes they can lift."),
            ("port", "Container cranes at the port unload ships in minutes."),
            ("wind", "Crane work stops when the wind is too strong to lift loads safely."),
        ],
    ],
    "mouse": [
        [
            ("diet", "The small rodent nibbles seeds, grain and crumbs left in kitchens."),
            ("young", "A female rodent can give birth to a litter of pups every three weeks."),
            ("predators", "Owls, cats and snakes all hunt the tiny field rodent."),
            ("nest", "The little rodent builds a nest of shredded paper and grass inside walls."),
            ("tail", "Its long thin tail helps the tiny rodent balance while climbing."),
        ],
        [
            ("buttons", "A computer mouse has a left button, a right button and a scroll wheel."),
            ("wireless", "A wireless mouse connects to the laptop over Bluetooth or a USB dongle."),
            ("sensor", "An optical mouse tracks movement with a small LED and sensor."),
            ("gaming", "Gaming mice have a high DPI setting and extra programmable buttons."),
            ("pad", "A mouse pad gives the sensor a smooth surface to track on."),
        ],
    ],
    "bank": [
        [
            ("erosion", "Floods wear away the muddy edge of the river and carry the soil downstream."),
            ("fishing", "Anglers sit on the grassy riverside and cast into the slow water."),
            ("plants", "Willows and reeds grow along the water's edge and hold the soil."),
            ("birds", "Kingfishers dig nesting tunnels in the steep earth beside the stream."),
            ("flooding", "When the river rises it spills over its sides onto the fields."),
        ],
        [
            ("loan", "A bank charges interest on a mortgage loan over twenty or thirty years."),
            ("account", "You can open a savings account at the bank with an ID card."),
            ("interest", "The central bank raises interest rates to slow inflation."),
            ("cards", "The bank sends a new debit card by post when the old one expires."),
            ("fees", "Some banks charge a monthly fee for a current account."),
        ],
    ],
}

TEMPLATES = ["{word} {aspect}", "what about the {aspect} of the {word}?", "tell me about {word} and {aspect}"]


def make_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for word, senses in SENSES.items():
        for s, facts in enumerate(senses):
            others = [fact for _, fact in senses[1 - s]]
            for aspect, fact in facts:
                for template in TEMPLATES:
                    rows.append(
                        {
                            "query": template.format(word=word, aspect=aspect),
                            "response": fact,
                            "rejected_response": rng.sample(others, 2),
                        }
                    )
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).parent / "tiny.jsonl"
    rows = make_rows()
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()

//! A strict reader of the OpenMetrics text format, for the tests that
//! scrape the daemon: it refuses what a scraper would (a sample of no
//! declared family, a duplicate series, a value that is not a number, a
//! histogram whose buckets shrink or whose `+Inf` bucket is not its count,
//! anything after or missing `# EOF`), and hands back the samples to check.

use std::collections::BTreeMap;

/// A sample's labels, by name.
pub type Labels = BTreeMap<String, String>;

/// One metric family: its `# TYPE` and `# HELP`, and its samples.
#[derive(Debug, Default, Clone)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, `info`, …
    pub kind: String,
    /// The `# HELP` text.
    pub help: String,
    /// The `# UNIT`, if any.
    pub unit: Option<String>,
    /// (sample name, labels, value), in the order given.
    pub samples: Vec<(String, Labels, f64)>,
}

/// A parsed exposition.
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, Family>,
}

/// The suffixes a sample of a family of `kind` may add to its name.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

/// Parses `text`, or says which line is wrong and why.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut eof = false;
    for (n, line) in text.split_terminator('\n').enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if eof {
            return Err(at("after # EOF"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (what, name, value) = (words.next(), words.next(), words.next());
            let (Some(what), Some(name)) = (what, name) else {
                return Err(at("a comment that is no descriptor"));
            };
            let family = out.families.entry(name.to_owned()).or_default();
            let value = value.unwrap_or("").to_owned();
            match what {
                "TYPE" => family.kind = value,
                "HELP" => family.help = value,
                "UNIT" => family.unit = Some(value),
                _ => return Err(at("an unknown descriptor")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("a value that is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Labels::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                (name, labels_of(body).map_err(|e| at(&e))?)
            }
        };
        if !seen.insert((name.to_owned(), labels.clone())) {
            return Err(at("a series given twice"));
        }
        let family = out
            .families
            .iter_mut()
            .find(|(family, f)| {
                suffixes(&f.kind)
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family.as_str()))
            })
            .map(|(_, f)| f)
            .ok_or_else(|| at("a sample of no declared family"))?;
        family.samples.push((name.to_owned(), labels, value));
    }
    if !eof {
        return Err("no # EOF at the end".into());
    }
    for (name, family) in &out.families {
        if family.kind.is_empty() {
            return Err(format!("family {name} has no # TYPE"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(out)
}

/// `k="v",k2="v2"`, with `\\`, `\"` and `\n` escapes.
fn labels_of(body: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("a bad escape in a label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(format!("label {key} given twice"));
        }
        rest = &after[end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(more) => more,
            None if rest.is_empty() => rest,
            None => return Err("labels not separated by ','".into()),
        };
    }
    Ok(labels)
}

/// Each series of a histogram: buckets that never shrink, ending with
/// `+Inf`, whose count is `_count`.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    /// A series' (bound, cumulative count) buckets and its `_count`.
    type Series = (Vec<(f64, f64)>, Option<f64>);
    let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
    for (sample, labels, value) in &family.samples {
        let mut key = labels.clone();
        let le = key.remove("le");
        let entry = series.entry(key).or_default();
        if sample.ends_with("_bucket") {
            let le = le.ok_or_else(|| format!("{name}: a bucket without le"))?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()
                    .map_err(|_| format!("{name}: le {le:?} is not a number"))?
            };
            entry.0.push((bound, *value));
        } else if sample.ends_with("_count") {
            entry.1 = Some(*value);
        }
    }
    for (labels, (mut buckets, count)) in series {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{name}{labels:?}: buckets shrink: {buckets:?}"));
        }
        match (buckets.last(), count) {
            (Some((bound, inf)), Some(count)) if bound.is_infinite() && *inf == count => {}
            _ => {
                return Err(format!(
                    "{name}{labels:?}: the +Inf bucket is not the count ({buckets:?}, {count:?})"
                ));
            }
        }
    }
    Ok(())
}

impl Exposition {
    /// The value of sample `name` with exactly the labels `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// Like [`Exposition::value`], panicking when there is no such sample.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_exposition_parses_and_bad_ones_do_not() {
        let good = "# HELP a Things.\n# TYPE a counter\na_total{k=\"v\\\"\"} 3\n\
                    # TYPE h histogram\nh_sum 1.5\nh_count 2\nh_bucket{le=\"1.0\"} 1\n\
                    h_bucket{le=\"+Inf\"} 2\n# EOF\n";
        let e = parse(good).unwrap();
        assert_eq!(e.get("a_total", &[("k", "v\"")]), 3.0);
        assert_eq!(e.get("h_count", &[]), 2.0);
        for bad in [
            "# TYPE a counter\na_total 1\n",                   // no EOF
            "# TYPE a counter\na_total 1\n# EOF\nx 1\n",       // after EOF
            "# TYPE a counter\nb_total 1\n# EOF\n",            // no family
            "# TYPE a counter\na_total 1\na_total 2\n# EOF\n", // twice
            "# TYPE a gauge\na one\n# EOF\n",                  // not a number
            "# TYPE h histogram\nh_count 2\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
            "# TYPE h histogram\nh_count 3\nh_bucket{le=\"+Inf\"} 2\n# EOF\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}

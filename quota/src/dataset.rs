//! The dataset registry's document schema (`kind: Dataset`) and the dataset
//! constraints a license can carry, with their validation.
//!
//! A dataset is an id and its releases; each release says where the data
//! came from (`source`), which sensitive categories it holds (`categories`)
//! and under which terms it may be used (`license`, an SPDX license
//! expression). Field names follow Croissant and its Responsible-AI
//! extension where one fits (`name`, `description`, `creators`,
//! `date_published`, `license`; `categories` is the machine-readable form
//! of Croissant-RAI's `personalSensitiveInformation`), and the Data
//! Provenance Initiative's audit vocabulary otherwise (`source`).
//!
//! A license's [`DatasetConstraints`] say which sources it accepts, which
//! categories it denies, which datasets may not feed one invocation
//! together, and whether every Check must carry lineage. Whether a request
//! meets them is the decision module's business; this module only owns the
//! shapes and their checks, and must not read the clock.

use std::collections::HashSet;
use std::fmt;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize, Serializer};

use crate::license::{
    ApiVersion, MAX_ID_LEN, MAX_TEXT_LEN, ValidationError, check_id, check_len, check_text,
};
use crate::request::MAX_LINEAGE;

/// Longest SPDX license expression accepted, in bytes.
pub const MAX_LICENSE_EXPRESSION_LEN: usize = 512;

/// Most releases one dataset document may list.
pub const MAX_RELEASES: usize = 256;

/// Longest dataset description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 4 * MAX_TEXT_LEN;

/// The `kind: Dataset` marker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatasetKind {
    /// `Dataset`.
    #[default]
    Dataset,
}

/// A registered dataset and its releases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Always `tollgate/v1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: ApiVersion,
    /// Always `Dataset`.
    #[serde(default)]
    pub kind: DatasetKind,
    /// Dataset id, `[a-z0-9._-]{1,64}`; what lineage entries name.
    pub id: String,
    /// Display name (Croissant `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the data is (Croissant `description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who made it (Croissant `creator`, Data Provenance `Creators`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub creators: Vec<String>,
    /// Released versions.
    pub releases: Vec<DatasetRelease>,
}

/// One release (version) of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRelease {
    /// Release id, e.g. `2025.1` or `v3`: 1 to 64 of `A-Z a-z 0-9 . _ + -`.
    pub version: String,
    /// Release date (Croissant `datePublished`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_published: Option<NaiveDate>,
    /// Where the data came from (the provenance source a license's
    /// `allowed_sources` names), `[a-z0-9._-]{1,64}`.
    pub source: String,
    /// Sensitive categories the data holds (Croissant-RAI
    /// `personalSensitiveInformation`, plus `copyrighted`).
    #[serde(default)]
    pub categories: Vec<DatasetCategory>,
    /// The terms the data is used under, as an SPDX license expression.
    pub license: LicenseExpression,
}

/// A sensitive category of data. The list is closed on purpose: a denied
/// category that is misspelt in a license must be an error, not a rule that
/// silently never matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetCategory {
    /// Personally identifiable information.
    Pii,
    /// Health and medical data.
    Medical,
    /// Biometric data (faces, fingerprints, voice prints).
    Biometric,
    /// Genetic data.
    Genetic,
    /// Material under third-party copyright.
    Copyrighted,
    /// Data about children.
    Children,
    /// Financial records.
    Financial,
}

impl DatasetCategory {
    /// Every category, in a stable order.
    pub const ALL: [DatasetCategory; 7] = [
        DatasetCategory::Pii,
        DatasetCategory::Medical,
        DatasetCategory::Biometric,
        DatasetCategory::Genetic,
        DatasetCategory::Copyrighted,
        DatasetCategory::Children,
        DatasetCategory::Financial,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetCategory::Pii => "pii",
            DatasetCategory::Medical => "medical",
            DatasetCategory::Biometric => "biometric",
            DatasetCategory::Genetic => "genetic",
            DatasetCategory::Copyrighted => "copyrighted",
            DatasetCategory::Children => "children",
            DatasetCategory::Financial => "financial",
        }
    }
}

impl fmt::Display for DatasetCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated SPDX license expression (`CC-BY-4.0`, `MIT OR Apache-2.0`,
/// `CC-BY-NC-4.0 AND LicenseRef-vendor-terms`): identifiers from the SPDX
/// license list or `LicenseRef-` references, joined by `AND`, `OR` and
/// `WITH`, with parentheses. Serializes as its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseExpression(String);

impl LicenseExpression {
    /// Parses and validates `text` strictly (SPDX 2.x: case-sensitive
    /// identifiers, no deprecated ids, no `/` for `OR`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LICENSE_EXPRESSION_LEN {
            return Err(format!(
                "an SPDX license expression of at most {MAX_LICENSE_EXPRESSION_LEN} bytes"
            ));
        }
        spdx::Expression::parse(text).map_err(|e| {
            let term = text.get(e.span.clone()).unwrap_or_default();
            if term.is_empty() {
                format!("invalid SPDX license expression {text:?}: {}", e.reason)
            } else {
                format!(
                    "invalid SPDX license expression {text:?}: {} at {term:?}",
                    e.reason
                )
            }
        })?;
        Ok(Self(text.to_string()))
    }

    /// The expression's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LicenseExpression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for LicenseExpression {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LicenseExpression {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // `.license: ...` names the field itself (see `license::yaml_error`).
        LicenseExpression::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!(".license: {e}")))
    }
}

/// Whether `version` is a valid release id.
fn valid_release_id(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= MAX_ID_LEN
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

impl Dataset {
    /// The release with version `version`, if registered.
    pub fn release(&self, version: &str) -> Option<&DatasetRelease> {
        self.releases.iter().find(|r| r.version == version)
    }

    /// Semantic checks serde cannot express; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("id", &self.id)?;
        if let Some(name) = &self.name {
            check_text("name", name)?;
        }
        if let Some(description) = &self.description
            && description.len() > MAX_DESCRIPTION_LEN
        {
            return Err(ValidationError::new(
                "description",
                format!("at most {MAX_DESCRIPTION_LEN} bytes"),
            ));
        }
        check_len("creators", &self.creators)?;
        for (idx, creator) in self.creators.iter().enumerate() {
            check_text(&format!("creators[{idx}]"), creator)?;
        }
        if self.releases.is_empty() {
            return Err(ValidationError::new(
                "releases",
                "must list at least one release",
            ));
        }
        if self.releases.len() > MAX_RELEASES {
            return Err(ValidationError::new(
                "releases",
                format!("at most {MAX_RELEASES} entries"),
            ));
        }
        let mut versions = HashSet::new();
        for (idx, release) in self.releases.iter().enumerate() {
            let path = format!("releases[{idx}]");
            if !valid_release_id(&release.version) {
                return Err(ValidationError::new(
                    format!("{path}.version"),
                    format!(
                        "{:?} must be 1 to {MAX_ID_LEN} of A-Z, a-z, 0-9, '.', '_', '+' and '-'",
                        release.version
                    ),
                ));
            }
            if !versions.insert(release.version.as_str()) {
                return Err(ValidationError::new(
                    format!("{path}.version"),
                    format!("duplicate release {:?}", release.version),
                ));
            }
            check_id(&format!("{path}.source"), &release.source)?;
            let mut seen = HashSet::new();
            for (c_idx, category) in release.categories.iter().enumerate() {
                if !seen.insert(*category) {
                    return Err(ValidationError::new(
                        format!("{path}.categories[{c_idx}]"),
                        format!("duplicate category {category}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A license's dataset constraints (`datasets:` in a License document).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConstraints {
    /// Every Check must name the dataset releases that feed it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_lineage: bool,
    /// Provenance sources a dataset release may come from; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_sources: Option<Vec<String>>,
    /// Categories no dataset release feeding a use may hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_categories: Vec<DatasetCategory>,
    /// Sets of dataset ids that may not all feed one invocation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_combinations: Vec<Vec<String>>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl DatasetConstraints {
    /// Semantic checks, with paths under `datasets.`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(sources) = &self.allowed_sources {
            if sources.is_empty() {
                return Err(ValidationError::new(
                    "datasets.allowed_sources",
                    "must not be empty; omit it to allow every source",
                ));
            }
            check_len("datasets.allowed_sources", sources)?;
            let mut seen = HashSet::new();
            for (idx, source) in sources.iter().enumerate() {
                let path = format!("datasets.allowed_sources[{idx}]");
                check_id(&path, source)?;
                if !seen.insert(source.as_str()) {
                    return Err(ValidationError::new(
                        path,
                        format!("duplicate source {source:?}"),
                    ));
                }
            }
        }
        let mut seen = HashSet::new();
        for (idx, category) in self.denied_categories.iter().enumerate() {
            if !seen.insert(*category) {
                return Err(ValidationError::new(
                    format!("datasets.denied_categories[{idx}]"),
                    format!("duplicate category {category}"),
                ));
            }
        }
        check_len(
            "datasets.forbidden_combinations",
            &self.forbidden_combinations,
        )?;
        for (idx, combination) in self.forbidden_combinations.iter().enumerate() {
            let path = format!("datasets.forbidden_combinations[{idx}]");
            if combination.len() < 2 {
                return Err(ValidationError::new(
                    path,
                    "must name at least two datasets (deny one dataset with allowed_sources or denied_categories)",
                ));
            }
            if combination.len() > MAX_LINEAGE {
                return Err(ValidationError::new(
                    path,
                    format!(
                        "at most {MAX_LINEAGE} datasets: a request names at most {MAX_LINEAGE}, so a larger set could never match"
                    ),
                ));
            }
            let mut seen = HashSet::new();
            for (d_idx, dataset) in combination.iter().enumerate() {
                check_id(&format!("{path}[{d_idx}]"), dataset)?;
                if !seen.insert(dataset.as_str()) {
                    return Err(ValidationError::new(
                        format!("{path}[{d_idx}]"),
                        format!("duplicate dataset {dataset:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::{Document, parse_documents, parse_license};

    const DATASET: &str = "apiVersion: tollgate/v1\nkind: Dataset\nid: notes\n";

    /// Parses `DATASET` + `extra` and asserts the error contains every
    /// fragment of `expected` (or that it parses, when `expected` is empty).
    fn check(extra: &str, expected: &[&str]) {
        let result = parse_documents(&format!("{DATASET}{extra}"));
        match (result, expected.is_empty()) {
            (Ok(_), true) => {}
            (Ok(d), false) => panic!("expected an error containing {expected:?}, parsed {d:?}"),
            (Err(e), true) => panic!("unexpected error: {e}"),
            (Err(e), false) => {
                let text = e.to_string();
                for fragment in expected {
                    assert!(
                        text.contains(fragment),
                        "{text:?} should contain {fragment:?}"
                    );
                }
            }
        }
    }

    const RELEASE: &str = "releases: [{ version: \"2025.1\", source: hospital, categories: [pii, medical], license: CC-BY-4.0 }]\n";

    #[test]
    fn dataset_validation_names_the_field() {
        check(RELEASE, &[]);
        check(
            "name: Clinical notes\ncreators: [St. Example]\ndescription: De-identified notes.\nreleases:\n  - { version: v1, date_published: 2025-01-10, source: hospital, license: \"MIT OR Apache-2.0\" }\n  - { version: v2, source: hospital, license: \"(CC-BY-NC-4.0 AND LicenseRef-hospital-dua) OR GPL-2.0-only WITH Classpath-exception-2.0\" }\n",
            &[],
        );
        check(
            "releases: []\n",
            &["releases: must list at least one release"],
        );
        check(
            "releases: [{ version: \"a b\", source: s, license: MIT }]\n",
            &["releases[0].version", "must be 1 to 64"],
        );
        check(
            "releases:\n  - { version: v1, source: s, license: MIT }\n  - { version: v1, source: s, license: MIT }\n",
            &["releases[1].version: duplicate release"],
        );
        check(
            "releases: [{ version: v1, source: Bad!, license: MIT }]\n",
            &["releases[0].source"],
        );
        check(
            "releases: [{ version: v1, source: s, categories: [pii, medcial], license: MIT }]\n",
            &["releases[0].categories[1]", "medcial"],
        );
        check(
            "releases: [{ version: v1, source: s, categories: [pii, pii], license: MIT }]\n",
            &["releases[0].categories[1]: duplicate category pii"],
        );
        check(
            "releases: [{ version: v1, source: s, license: MIT AND }]\n",
            &["releases[0].license", "invalid SPDX license expression"],
        );
        check(
            "releases: [{ version: v1, source: s, license: Not-A-License }]\n",
            &["releases[0].license", "unknown", "Not-A-License"],
        );
        check(
            "releases: [{ version: v1, source: s, license: \"(MIT\" }]\n",
            &["releases[0].license", "unclosed parens"],
        );
        check(
            "releases: [{ version: v1, source: s, license: MIT, colour: red }]\n",
            &["releases[0]", "unknown field `colour`"],
        );
        check(
            "releases: [{ version: v1, source: s }]\n",
            &["releases[0]", "missing field `license`"],
        );
    }

    #[test]
    fn datasets_round_trip_through_json_and_yaml() {
        let docs = parse_documents(&format!("{DATASET}name: Notes\n{RELEASE}")).unwrap();
        let Some(Document::Dataset(dataset)) = docs.first() else {
            panic!("expected a dataset: {docs:?}");
        };
        assert_eq!(
            dataset.release("2025.1").map(|r| r.source.as_str()),
            Some("hospital")
        );
        let json = serde_json::to_string(dataset).unwrap();
        let back = parse_documents(&json).unwrap();
        assert_eq!(back, docs);
        let yaml = serde_yaml::to_string(dataset).unwrap();
        assert_eq!(parse_documents(&yaml).unwrap(), docs);
    }

    const LICENSE: &str = "apiVersion: tollgate/v1\nkind: License\nid: l\ncustomer: C\n";

    fn check_license(extra: &str, expected: Option<&str>) {
        let result = parse_license(&format!("{LICENSE}{extra}"));
        match expected {
            None => {
                let license = result.unwrap_or_else(|e| panic!("unexpected error: {e}"));
                let json = serde_json::to_string(&license).unwrap();
                assert_eq!(parse_license(&json).unwrap(), license);
            }
            Some(fragment) => {
                let text = result
                    .map(|l| format!("parsed {l:?}"))
                    .unwrap_or_else(|e| e.to_string());
                assert!(
                    text.contains(fragment),
                    "{text:?} should contain {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn license_constraints_validation() {
        check_license(
            "datasets:\n  require_lineage: true\n  allowed_sources: [vendor, internal]\n  denied_categories: [medical, biometric]\n  forbidden_combinations: [[crm, web-profiles]]\n",
            None,
        );
        check_license("datasets: {}\n", None);
        check_license(
            "datasets: { allowed_sources: [] }\n",
            Some("datasets.allowed_sources: must not be empty"),
        );
        check_license(
            "datasets: { allowed_sources: [a, a] }\n",
            Some("datasets.allowed_sources[1]: duplicate source"),
        );
        check_license(
            "datasets: { allowed_sources: [\"Vendor X\"] }\n",
            Some("datasets.allowed_sources[0]"),
        );
        check_license(
            "datasets: { denied_categories: [medical, medical] }\n",
            Some("datasets.denied_categories[1]: duplicate category medical"),
        );
        check_license(
            "datasets: { denied_categories: [secret] }\n",
            Some("datasets.denied_categories"),
        );
        check_license(
            "datasets: { forbidden_combinations: [[a]] }\n",
            Some("datasets.forbidden_combinations[0]: must name at least two datasets"),
        );
        check_license(
            "datasets: { forbidden_combinations: [[a, b], [c, c]] }\n",
            Some("datasets.forbidden_combinations[1][1]: duplicate dataset"),
        );
        let too_many: Vec<String> = (0..=MAX_LINEAGE).map(|i| format!("d{i}")).collect();
        check_license(
            &format!(
                "datasets: {{ forbidden_combinations: [[{}]] }}\n",
                too_many.join(", ")
            ),
            Some("datasets.forbidden_combinations[0]: at most 16 datasets"),
        );
        check_license(
            "datasets: { require_linage: true }\n",
            Some("unknown field `require_linage`"),
        );
    }

    #[test]
    fn every_category_round_trips_by_name() {
        for category in DatasetCategory::ALL {
            let json = serde_json::to_string(&category).unwrap();
            assert_eq!(json, format!("\"{category}\""));
            let back: DatasetCategory = serde_json::from_str(&json).unwrap();
            assert_eq!(back, category);
        }
    }
}

//! The 证照分离 permit catalogue (`workflows/catalogues/permits.ron`): import of
//! the official item lists (附件1 中央层面设定, 附件2 河北层面设定) from CSV, merge
//! into the catalogue, and writing the catalogue back as RON.
//!
//! The official annexes are not public, so the shipped catalogue holds
//! placeholder rows with the seed's exact counts (status
//! `AwaitingOfficialList`). Importing a level replaces its placeholders;
//! totals stay as declared so that the validator reports any mismatch.
//!
//! Nothing here panics on bad input: every problem with a CSV file is an
//! [`ImportError`] naming the file, the line (1-based, header = line 1) and
//! the column.

use ron::Value;

use crate::lang::model::{Agencies, Catalogue, CatalogueStatus, Column, Level, Type};

/// The permit catalogue's columns, in row order. The first is the key.
pub const COLUMNS: [&str; 10] = [
    "id",
    "name",
    "basis",
    "level",
    "department_text",
    "department",
    "supervisor",
    "way",
    "measures",
    "supervision",
];

/// Names of placeholder rows start with this.
pub const PLACEHOLDER_PREFIX: &str = "待官方清单";

/// Default approving department: 石家庄市行政审批局 (相对集中行政许可).
pub const DEFAULT_DEPARTMENT: &str = "hebei.sjz.approval";
/// Default supervising department: 石家庄市市场监督管理局.
pub const DEFAULT_SUPERVISOR: &str = "hebei.sjz.amr";

/// The four ways of reform: column value, official wording, accepted short form.
pub const WAYS: [(&str, &str, &str); 4] = [
    ("abolish", "直接取消审批", "取消审批"),
    ("filing", "审批改为备案", "改为备案"),
    ("commitment", "实行告知承诺", "告知承诺"),
    ("optimise", "优化审批服务", "优化服务"),
];

/// The column definitions of the permit catalogue.
pub fn permit_columns() -> Vec<Column> {
    let col = |name: &str, ty: Type, title: &str| Column {
        name: name.into(),
        ty,
        title: title.into(),
    };
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
    vec![
        col("id", Type::String, "编号"),
        col("name", Type::String, "事项名称"),
        col("basis", Type::String, "设定依据"),
        col(
            "level",
            Type::Enum(strings(&["central", "hebei"])),
            "设定层级（中央层面 / 河北层面）",
        ),
        col("department_text", Type::String, "审批层级和部门"),
        col("department", Type::Agency, "审批部门"),
        col("supervisor", Type::Agency, "监管部门"),
        col(
            "way",
            Type::Enum(WAYS.iter().map(|w| w.0.to_string()).collect()),
            "改革方式",
        ),
        col("measures", Type::String, "具体改革举措"),
        col("supervision", Type::String, "事中事后监管措施"),
    ]
}

/// Which annex a CSV holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImportLevel {
    /// 附件1: items set by law, administrative regulation or State Council decision.
    Central,
    /// 附件2: items set by Hebei's local regulations and government rules.
    Hebei,
}

impl ImportLevel {
    /// The value of the `level` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportLevel::Central => "central",
            ImportLevel::Hebei => "hebei",
        }
    }

    /// `central` or `hebei` (as on the command line).
    pub fn parse(s: &str) -> Option<ImportLevel> {
        match s.trim() {
            "central" => Some(ImportLevel::Central),
            "hebei" => Some(ImportLevel::Hebei),
            _ => None,
        }
    }

    /// Prefix of generated row ids, e.g. `ZZFL-C-001`.
    pub fn default_id_prefix(self) -> &'static str {
        match self {
            ImportLevel::Central => "ZZFL-C-",
            ImportLevel::Hebei => "ZZFL-H-",
        }
    }
}

impl std::fmt::Display for ImportLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to import one annex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    pub level: ImportLevel,
    /// Row ids are this prefix plus a three-digit serial in file order;
    /// `None` uses [`ImportLevel::default_id_prefix`].
    pub id_prefix: Option<String>,
    /// Agency id used when 审批层级和部门 names no known department.
    pub default_department: String,
    /// Agency id used when no supervising department can be recognised.
    pub default_supervisor: String,
}

impl ImportOptions {
    /// Options with the default prefix, 行政审批局 approving and 市场监管局 supervising.
    pub fn new(level: ImportLevel) -> ImportOptions {
        ImportOptions {
            level,
            id_prefix: None,
            default_department: DEFAULT_DEPARTMENT.into(),
            default_supervisor: DEFAULT_SUPERVISOR.into(),
        }
    }
}

const WAY_ERROR_LIST: &str = "直接取消审批, 审批改为备案, 实行告知承诺, 优化审批服务";

/// A problem with an imported CSV file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: neither UTF-8 nor GB18030 (GBK) text: save the CSV as UTF-8")]
    Encoding { file: String },
    #[error(
        "{file}: the file is {encoding} text (Excel's \"Unicode text\"), not UTF-8: save it as \"CSV UTF-8\", or convert it with `iconv -f {iconv} -t UTF-8`"
    )]
    WideEncoding {
        file: String,
        encoding: &'static str,
        iconv: &'static str,
    },
    #[error("{file}: the file is empty: it needs a header row and the catalogue's rows")]
    EmptyFile { file: String },
    /// The CSV itself is malformed (e.g. an unclosed quote).
    #[error("{file}:{line}: malformed CSV: {message}")]
    Csv {
        file: String,
        line: u64,
        message: String,
    },
    #[error(
        "{file}:1: the header has no column {column} (official columns: 事项名称, 设定依据, 审批层级和部门, 改革方式, 具体改革举措, 事中事后监管措施)"
    )]
    MissingColumn { file: String, column: &'static str },
    #[error("{file}:1: column {column} appears more than once in the header")]
    DuplicateColumn { file: String, column: String },
    #[error("{file}:{line}: the row has {found} fields but the header has {expected}")]
    FieldCount {
        file: String,
        line: u64,
        found: usize,
        expected: usize,
    },
    #[error("{file}:{line}: {column} is empty")]
    Empty {
        file: String,
        line: u64,
        column: String,
    },
    #[error("{file}:{line}: {column} `{value}` is not one of {WAY_ERROR_LIST}")]
    UnknownWay {
        file: String,
        line: u64,
        column: String,
        value: String,
    },
    #[error(
        "{file}:{line}: 改革方式 is marked in {marked} of the columns {WAY_ERROR_LIST}; mark exactly one"
    )]
    WayMarks {
        file: String,
        line: u64,
        marked: usize,
    },
    #[error("{file}:1: no item rows; importing it would erase every {level} row")]
    NoRows { file: String, level: ImportLevel },
    #[error("{file}: default {role} `{id}` is not an agency of the directory")]
    UnknownDefault {
        file: String,
        role: &'static str,
        id: String,
    },
}

/// The official columns a CSV header must have, with accepted alternative spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Official {
    Name,
    Basis,
    DepartmentText,
    Way,
    Measures,
    Supervision,
}

impl Official {
    const ALL: [Official; 6] = [
        Official::Name,
        Official::Basis,
        Official::DepartmentText,
        Official::Way,
        Official::Measures,
        Official::Supervision,
    ];

    fn title(self) -> &'static str {
        self.spellings()[0]
    }

    fn spellings(self) -> &'static [&'static str] {
        match self {
            Official::Name => &["事项名称", "改革事项"],
            Official::Basis => &["设定依据"],
            Official::DepartmentText => &["审批层级和部门"],
            Official::Way => &["改革方式"],
            Official::Measures => &["具体改革举措"],
            Official::Supervision => &["事中事后监管措施", "加强事中事后监管措施"],
        }
    }
}

/// Optional column naming the competent (supervising) department.
const COMPETENT_SPELLINGS: [&str; 2] = ["主管部门", "业务主管部门"];

/// Header cells compare without whitespace (Excel headers often wrap).
fn normalise_header(cell: &str) -> String {
    cell.chars()
        .filter(|c| !c.is_whitespace() && *c != '\u{feff}')
        .collect()
}

/// Where each known column is in the file.
struct Layout {
    official: [Option<usize>; 6],
    /// The four 改革方式 mark columns (直接取消审批 … 优化审批服务), when the
    /// list is laid out with one column per way instead of one 改革方式 column.
    way_marks: [Option<usize>; 4],
    competent: Option<usize>,
    width: usize,
}

impl Layout {
    fn from_header(file: &str, header: &csv::StringRecord) -> Result<Layout, ImportError> {
        let mut layout = Layout {
            official: [None; 6],
            way_marks: [None; 4],
            competent: None,
            width: header.len(),
        };
        for (index, cell) in header.iter().enumerate() {
            let cell = normalise_header(cell);
            if cell.is_empty() {
                continue;
            }
            let slot = if let Some(k) = Official::ALL
                .iter()
                .position(|o| o.spellings().contains(&cell.as_str()))
            {
                Some((
                    &mut layout.official[k],
                    Official::ALL[k].title().to_string(),
                ))
            } else if let Some(k) = WAYS.iter().position(|w| w.1 == cell) {
                Some((&mut layout.way_marks[k], cell.clone()))
            } else if COMPETENT_SPELLINGS.contains(&cell.as_str()) {
                Some((&mut layout.competent, COMPETENT_SPELLINGS[0].to_string()))
            } else {
                None // 序号, 备注 and other extra columns are ignored
            };
            if let Some((slot, title)) = slot {
                if slot.is_some() {
                    return Err(ImportError::DuplicateColumn {
                        file: file.into(),
                        column: title,
                    });
                }
                *slot = Some(index);
            }
        }
        for (k, official) in Official::ALL.iter().enumerate() {
            let marks_instead =
                *official == Official::Way && layout.way_marks.iter().all(Option::is_some);
            if layout.official[k].is_none() && !marks_instead {
                return Err(ImportError::MissingColumn {
                    file: file.into(),
                    column: official.title(),
                });
            }
        }
        Ok(layout)
    }

    fn field<'r>(&self, record: &'r csv::StringRecord, official: Official) -> &'r str {
        let k = Official::ALL
            .iter()
            .position(|o| *o == official)
            .unwrap_or(0);
        self.official[k]
            .and_then(|i| record.get(i))
            .map(str::trim)
            .unwrap_or("")
    }
}

/// Maps the text of a 改革方式 cell to the `way` value.
///
/// Accepted (whitespace ignored): the official wordings 直接取消审批,
/// 审批改为备案, 实行告知承诺, 优化审批服务; the short forms 取消审批, 改为备案,
/// 告知承诺, 优化服务; and the column values abolish, filing, commitment,
/// optimise. Each of these names one way only; anything else (e.g. a bare
/// `取消`) is an error.
pub fn parse_way(text: &str) -> Option<&'static str> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    WAYS.iter()
        .find(|(value, official, short)| text == *value || text == *official || text == *short)
        .map(|w| w.0)
}

/// A cell of a 改革方式 mark column counts as marked unless empty or a "no".
fn is_marked(cell: &str) -> bool {
    let cell = cell.trim();
    !cell.is_empty()
        && ![
            "否", "无", "×", "✗", "✘", "-", "—", "－", "/", "0", "N", "n", "no", "No",
        ]
        .contains(&cell)
}

/// Keywords of 审批层级和部门 (or 主管部门) texts and the name fragment of the
/// City-level agency they denote.
const DEPARTMENT_KEYWORDS: &[(&[&str], &str)] = &[
    (&["行政审批"], "行政审批局"),
    (
        &[
            "市场监管",
            "市场监督",
            "工商",
            "质监",
            "质量技术监督",
            "食品药品",
            "药品监管",
            "药监",
            "知识产权",
        ],
        "市场监督管理局",
    ),
    (
        &["卫生健康", "卫健", "卫生计生", "中医药", "卫生"],
        "卫生健康委员会",
    ),
    (&["生态环境", "环境保护", "环保"], "生态环境局"),
    (
        &[
            "住房城乡建设",
            "住房和城乡建设",
            "住建",
            "建设主管",
            "建设行政",
        ],
        "住房和城乡建设局",
    ),
    (
        &["自然资源", "国土", "规划", "测绘", "林业", "草原"],
        "自然资源和规划局",
    ),
    (&["交通运输", "交通"], "交通运输局"),
    (&["公安"], "公安局"),
    (&["商务"], "商务局"),
    (
        &["工业和信息化", "工信", "经济和信息化", "无线电"],
        "工业和信息化局",
    ),
    (&["人力资源", "人社", "社会保障"], "人力资源和社会保障局"),
    (&["财政"], "财政局"),
    (&["司法"], "司法局"),
    (&["税务"], "税务局"),
    (&["文化", "旅游", "广播电视", "广电"], "文化广电和旅游局"),
    (&["教育"], "教育局"),
    (&["民政"], "民政局"),
    (&["水利", "水务", "水行政"], "水利局"),
    (
        &["农业农村", "农业", "畜牧", "兽医", "渔业", "农机"],
        "农业农村局",
    ),
    (
        &["应急管理", "安全生产", "安全监管", "安监", "煤矿安全"],
        "应急管理局",
    ),
    (&["城市管理", "城管"], "城市管理综合行政执法局"),
    (&["科学技术", "科技"], "科学技术局"),
    (&["地方金融", "金融"], "地方金融监督管理局"),
    (
        &["发展改革", "发展和改革", "发改", "能源"],
        "发展和改革委员会",
    ),
    (&["审计"], "审计局"),
    (&["海关"], "海关"),
];

/// Keyword → agency id, for the keywords whose agency the directory has.
struct Matcher<'a> {
    keywords: Vec<(&'static str, &'a str)>,
}

impl<'a> Matcher<'a> {
    fn new(agencies: &'a Agencies) -> Matcher<'a> {
        let mut keywords = Vec::new();
        for (words, fragment) in DEPARTMENT_KEYWORDS {
            let found = agencies
                .agencies
                .iter()
                .find(|a| a.level == Level::City && a.name.contains(fragment));
            if let Some(agency) = found {
                keywords.extend(words.iter().map(|w| (*w, agency.id.as_str())));
            }
        }
        Matcher { keywords }
    }

    /// The agency of the keyword occurring first in `text` (the longest on a
    /// tie). 人民政府 is read as 政府 so that it does not match 民政.
    fn find(&self, text: &str) -> Option<&'a str> {
        let text = text.replace("人民政府", "政府");
        self.keywords
            .iter()
            .filter_map(|(word, id)| text.find(word).map(|at| (at, word.len(), *id)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|m| m.2)
    }
}

/// The text of a CSV file and the encoding it was read in: UTF-8, or else
/// GB18030 (which includes GBK and GB2312), as Excel on Chinese Windows
/// saves CSV files.
pub fn csv_text(file_name: &str, bytes: &[u8]) -> Result<(String, &'static str), ImportError> {
    if let Some((encoding, iconv)) = crate::lang::load::wide_encoding(bytes) {
        return Err(ImportError::WideEncoding {
            file: file_name.into(),
            encoding,
            iconv,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ImportError::EmptyFile {
            file: file_name.into(),
        });
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok((text.to_owned(), "UTF-8"));
    }
    let (text, had_errors) = encoding_rs::GB18030.decode_without_bom_handling(bytes);
    if had_errors {
        return Err(ImportError::Encoding {
            file: file_name.into(),
        });
    }
    Ok((text.into_owned(), "GB18030"))
}

/// Reads one official annex as CSV and returns catalogue rows in the order of
/// [`COLUMNS`] (all values strings).
///
/// The header must have the official columns 事项名称, 设定依据, 审批层级和部门,
/// 改革方式, 具体改革举措, 事中事后监管措施, in any order; whitespace inside
/// header cells is ignored, 改革事项 is accepted for 事项名称 and
/// 加强事中事后监管措施 for 事中事后监管措施. Instead of one 改革方式 column the
/// header may have the four mark columns 直接取消审批, 审批改为备案, 实行告知承诺,
/// 优化审批服务, exactly one of them marked (√, ✓, 是, …) per row. Other
/// columns (序号, 备注, …) are ignored. The text is UTF-8, with or without BOM;
/// blank rows are skipped, and so are empty cells beyond the header's width;
/// any other row whose width differs from the header's is an error.
///
/// 改革方式 is read by [`parse_way`]. `department` is the City-level agency
/// whose name matches the first department keyword in 审批层级和部门 (e.g.
/// 市场监管 → 石家庄市市场监督管理局), else `default_department`. `supervisor`
/// is matched the same way from an optional 主管部门 column, else from the
/// 事中事后监管措施 text, else it is `default_supervisor`.
///
/// 事项名称 and 改革方式 must not be empty. Rows get ids `prefix` + serial
/// (`ZZFL-C-001`, …) in file order.
pub fn import_csv(
    file_name: &str,
    csv_text: &str,
    agencies: &Agencies,
    options: &ImportOptions,
) -> Result<Vec<Vec<Value>>, ImportError> {
    for (role, id) in [
        ("department", &options.default_department),
        ("supervisor", &options.default_supervisor),
    ] {
        if !agencies.agencies.iter().any(|a| &a.id == id) {
            return Err(ImportError::UnknownDefault {
                file: file_name.into(),
                role,
                id: id.clone(),
            });
        }
    }
    let text = csv_text.strip_prefix('\u{feff}').unwrap_or(csv_text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let csv_error = |e: csv::Error, fallback: u64| ImportError::Csv {
        file: file_name.into(),
        line: e.position().map_or(fallback, |p| p.line()),
        message: e.to_string(),
    };
    let header = reader.headers().map_err(|e| csv_error(e, 1))?.clone();
    let layout = Layout::from_header(file_name, &header)?;
    let matcher = Matcher::new(agencies);
    let prefix = options
        .id_prefix
        .clone()
        .unwrap_or_else(|| options.level.default_id_prefix().to_string());

    let mut rows = Vec::new();
    let mut lines = LineCounter::new(text);
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(e, lines.line + 1))?;
        let line = match record.position() {
            Some(p) => lines.line_at(p.byte()),
            None => lines.line + 1,
        };
        if record.iter().all(|cell| cell.trim().is_empty()) {
            continue;
        }
        // Trailing empty cells (a spreadsheet's stray commas) are harmless.
        let extra_empty = record.len() > layout.width
            && record
                .iter()
                .skip(layout.width)
                .all(|c| c.trim().is_empty());
        if record.len() != layout.width && !extra_empty {
            return Err(ImportError::FieldCount {
                file: file_name.into(),
                line,
                found: record.len(),
                expected: layout.width,
            });
        }
        let name = layout.field(&record, Official::Name);
        if name.is_empty() {
            return Err(ImportError::Empty {
                file: file_name.into(),
                line,
                column: Official::Name.title().into(),
            });
        }
        let way = read_way(file_name, line, &layout, &record)?;
        let department_text = layout.field(&record, Official::DepartmentText);
        let supervision = layout.field(&record, Official::Supervision);
        let department = matcher
            .find(department_text)
            .unwrap_or(options.default_department.as_str());
        let competent = layout
            .competent
            .and_then(|i| record.get(i))
            .and_then(|text| matcher.find(text));
        let supervisor = competent
            .or_else(|| matcher.find(supervision))
            .unwrap_or(options.default_supervisor.as_str());
        let id = format!("{prefix}{:03}", rows.len() + 1);
        let row = [
            id.as_str(),
            name,
            layout.field(&record, Official::Basis),
            options.level.as_str(),
            department_text,
            department,
            supervisor,
            way,
            layout.field(&record, Official::Measures),
            supervision,
        ];
        rows.push(
            row.iter()
                .map(|s| Value::String(s.replace("\r\n", "\n")))
                .collect(),
        );
    }
    if rows.is_empty() {
        return Err(ImportError::NoRows {
            file: file_name.into(),
            level: options.level,
        });
    }
    Ok(rows)
}

/// Line numbers of record starts. csv's own `Position::line` counts the blank
/// lines it skips before a record as part of it, so the start is found here:
/// the first byte at or after the record's offset that is not a line break.
struct LineCounter<'t> {
    bytes: &'t [u8],
    /// Bytes before `offset` have been counted.
    offset: usize,
    /// The line `offset` is on (1-based).
    line: u64,
}

impl<'t> LineCounter<'t> {
    fn new(text: &'t str) -> LineCounter<'t> {
        LineCounter {
            bytes: text.as_bytes(),
            offset: 0,
            line: 1,
        }
    }

    fn line_at(&mut self, byte: u64) -> u64 {
        let len = self.bytes.len();
        let mut start = usize::try_from(byte).unwrap_or(len).clamp(self.offset, len);
        while start < len && matches!(self.bytes[start], b'\n' | b'\r') {
            start += 1;
        }
        let newlines = self.bytes[self.offset..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.line += newlines as u64;
        self.offset = start;
        self.line
    }
}

fn read_way(
    file: &str,
    line: u64,
    layout: &Layout,
    record: &csv::StringRecord,
) -> Result<&'static str, ImportError> {
    if let Some(i) = layout.official[3] {
        let text = record.get(i).map(str::trim).unwrap_or("");
        let column = header_title(Official::Way);
        if text.is_empty() {
            return Err(ImportError::Empty {
                file: file.into(),
                line,
                column,
            });
        }
        return parse_way(text).ok_or_else(|| ImportError::UnknownWay {
            file: file.into(),
            line,
            column,
            value: text.into(),
        });
    }
    let marked: Vec<usize> = layout
        .way_marks
        .iter()
        .enumerate()
        .filter(|(_, col)| col.and_then(|i| record.get(i)).is_some_and(is_marked))
        .map(|(k, _)| k)
        .collect();
    match marked.as_slice() {
        [k] => Ok(WAYS[*k].0),
        _ => Err(ImportError::WayMarks {
            file: file.into(),
            line,
            marked: marked.len(),
        }),
    }
}

fn header_title(official: Official) -> String {
    official.title().to_string()
}

fn column_index(catalogue: &Catalogue, name: &str) -> Option<usize> {
    catalogue.columns.iter().position(|c| c.name == name)
}

fn cell_str(row: &[Value], index: usize) -> Option<&str> {
    match row.get(index) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// True when a row is a placeholder awaiting the official list.
pub fn is_placeholder(catalogue: &Catalogue, row: &[Value]) -> bool {
    let name = column_index(catalogue, "name").unwrap_or(1);
    cell_str(row, name).is_some_and(|s| s.starts_with(PLACEHOLDER_PREFIX))
}

/// Replaces the rows of `level` in `catalogue` with `rows` (at the place the
/// old ones held; a level without rows goes first if central, last if Hebei),
/// keeps the other level's rows, and sets the status to `Official` when no
/// placeholder row (name starting with 待官方清单) remains, else to
/// `AwaitingOfficialList`. Totals are left as declared, so a count that
/// differs from the seed's stays visible to the validator.
pub fn merge(catalogue: &mut Catalogue, level: ImportLevel, rows: Vec<Vec<Value>>) {
    let level_col = column_index(catalogue, "level").unwrap_or(3);
    let old = std::mem::take(&mut catalogue.rows);
    let mut kept = Vec::with_capacity(old.len() + rows.len());
    let mut insert_at = None;
    for row in old {
        if cell_str(&row, level_col) == Some(level.as_str()) {
            insert_at.get_or_insert(kept.len());
        } else {
            kept.push(row);
        }
    }
    let at = insert_at.unwrap_or(match level {
        ImportLevel::Central => 0,
        ImportLevel::Hebei => kept.len(),
    });
    kept.splice(at..at, rows);
    catalogue.rows = kept;
    let placeholders = catalogue
        .rows
        .iter()
        .any(|row| is_placeholder(catalogue, row));
    catalogue.status = if placeholders {
        CatalogueStatus::AwaitingOfficialList
    } else {
        CatalogueStatus::Official
    };
}

/// The options every RON file of the project is read with.
fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
}

/// Pretty RON text for a catalogue: a header comment, then the catalogue
/// with one column and one row per line; Chinese stays readable (only
/// control characters such as newlines are escaped). The text parses back
/// with the project's RON options (implicit `Some`).
pub fn to_ron(catalogue: &Catalogue) -> String {
    let config = ron::ser::PrettyConfig::new()
        .depth_limit(2)
        .indentor("    ")
        .struct_names(true)
        .extensions(ron::extensions::Extensions::IMPLICIT_SOME);
    let body = match ron_options().to_string_pretty(catalogue, config) {
        Ok(body) => body,
        Err(e) => {
            return format!(
                "// govflow could not write catalogue `{}` as RON: {e}\n",
                catalogue.name
            );
        }
    };
    let mut out = header_comment(catalogue);
    out.push_str(&body);
    out.push('\n');
    out
}

fn comment_lines(out: &mut String, text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            out.push_str("//\n");
        } else {
            out.push_str("// ");
            out.push_str(line);
            out.push('\n');
        }
    }
}

fn header_comment(catalogue: &Catalogue) -> String {
    let mut text = String::new();
    if !catalogue.source.is_empty() {
        text.push_str(&format!("Source: {}\n", catalogue.source));
    }
    let names: Vec<&str> = catalogue.columns.iter().map(|c| c.name.as_str()).collect();
    text.push_str(&format!(
        "Columns (the first is the key): {}.\nRows: {}, one per line.",
        names.join(", "),
        catalogue.rows.len()
    ));
    if let Some(totals) = &catalogue.totals {
        text.push_str(&format!(
            " Declared totals (checked by the validator): {} rows",
            totals.rows
        ));
        for by in &totals.by {
            let counts: Vec<String> = by.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            text.push_str(&format!("; by {}: {}", by.column, counts.join(", ")));
        }
        text.push('.');
    }
    text.push_str(
        "\nWritten by govflow (catalogue::to_ron); edit with care, re-import rewrites it.\n",
    );

    let placeholders = catalogue
        .rows
        .iter()
        .filter(|row| is_placeholder(catalogue, row))
        .count();
    let awaiting = catalogue.status == CatalogueStatus::AwaitingOfficialList || placeholders > 0;
    let mut out = format!(
        "// Catalogue `{}`: {}\n//\n",
        catalogue.name, catalogue.title
    );
    if awaiting {
        let bar = "!".repeat(76);
        out.push_str(&format!("// {bar}\n"));
        comment_lines(
            &mut out,
            &format!(
                "!! AWAITING THE OFFICIAL LIST: {placeholders} of {} rows are PLACEHOLDERS,\n\
                 !! not real permit items. Their names start with \"{PLACEHOLDER_PREFIX}\"; they\n\
                 !! only reproduce the counts the policy declares, so that workflows and the\n\
                 !! validator can run. Do not rely on their names, bases or departments.",
                catalogue.rows.len()
            ),
        );
        out.push_str(&format!("// {bar}\n//\n"));
        if names == COLUMNS {
            comment_lines(
                &mut out,
                "To import the official lists (附件1 中央层面设定, 附件2 河北层面设定), save each\n\
                 annex as a UTF-8 CSV (BOM allowed) whose header has the columns 事项名称, 设定依据,\n\
                 审批层级和部门, 改革方式, 具体改革举措, 事中事后监管措施 (any order; 序号 and\n\
                 other columns are ignored; 改革方式 may also be four mark columns 直接取消审批 /\n\
                 审批改为备案 / 实行告知承诺 / 优化审批服务), then run\n\
                 \n    govflow catalogue import --csv 附件1.csv --level central \\\n\
                 \x20       [--default-department hebei.sjz.approval] [--default-supervisor hebei.sjz.amr]\n\
                 \x20   govflow catalogue import --csv 附件2.csv --level hebei\n\
                 \n\
                 Each import replaces the rows of its level and rewrites this file; once no\n\
                 placeholder remains the status becomes Official. Totals stay as declared:\n\
                 if the official list has a different count, the validator reports it.\n",
            );
        } else {
            comment_lines(
                &mut out,
                "Replace the placeholder rows with the official list.\n",
            );
        }
        out.push_str("//\n");
    }
    comment_lines(&mut out, &text);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lang::model::Agencies;

    #[test]
    fn a_csv_is_read_as_utf8_else_gb18030_else_refused() {
        let text = "事项名称,改革方式\n食品经营许可,优化审批服务\n";
        assert_eq!(
            csv_text("a.csv", text.as_bytes()).expect("utf-8"),
            (text.to_owned(), "UTF-8")
        );
        let (gbk, _, _) = encoding_rs::GBK.encode(text);
        assert_eq!(
            csv_text("a.csv", &gbk).expect("gbk"),
            (text.to_owned(), "GB18030")
        );
        // Excel's "Unicode text" is UTF-16: said as such, not as "neither".
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(
                "事项名称,设定依据\n"
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes),
            )
            .collect();
        let refused = csv_text("u.csv", &utf16).expect_err("utf-16");
        assert!(
            refused.to_string().contains("UTF-16 (little-endian) text"),
            "{refused}"
        );
        assert!(matches!(
            csv_text("e.csv", b" \r\n"),
            Err(ImportError::EmptyFile { .. })
        ));
        let refused = csv_text("a.csv", &[0x80, 0xff, 0x41]).expect_err("neither");
        assert_eq!(
            refused.to_string(),
            "a.csv: neither UTF-8 nor GB18030 (GBK) text: save the CSV as UTF-8"
        );
    }

    const SAMPLE: &str = include_str!("../tests/data/catalogue/official_sample.csv");
    const AGENCIES: &str = include_str!("../workflows/agencies.ron");
    const PERMITS: &str = include_str!("../workflows/catalogues/permits.ron");

    fn agencies() -> Agencies {
        ron_options()
            .from_str(AGENCIES)
            .expect("agencies.ron parses")
    }

    fn permits() -> Catalogue {
        ron_options().from_str(PERMITS).expect("permits.ron parses")
    }

    fn s(v: &Value) -> &str {
        match v {
            Value::String(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn col(name: &str) -> usize {
        COLUMNS.iter().position(|c| *c == name).unwrap()
    }

    #[test]
    fn shipped_files_parse_with_the_project_options() {
        let agencies = agencies();
        let ids: Vec<&str> = agencies.agencies.iter().map(|a| a.id.as_str()).collect();
        for a in &agencies.agencies {
            assert!(a.id.is_ascii(), "{}", a.id);
            if let Some(parent) = &a.parent {
                assert!(ids.contains(&parent.as_str()), "{} parent {parent}", a.id);
                assert!(a.id.starts_with(&format!("{parent}.")), "{}", a.id);
            } else {
                assert_eq!(a.level, Level::Province);
            }
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "duplicate agency ids");
        let counties = agencies
            .agencies
            .iter()
            .filter(|a| a.level == Level::County && a.name.ends_with("人民政府"))
            .count();
        assert_eq!(
            counties, 22,
            "Shijiazhuang's 8 districts, 11 counties, 3 cities"
        );

        let permits = permits();
        assert_eq!(permits.status, CatalogueStatus::AwaitingOfficialList);
        assert_eq!(permits.columns, permit_columns());
        assert_eq!(permits.rows.len(), 540);
        let totals = permits.totals.as_ref().unwrap();
        assert_eq!(totals.rows, 540);
        for by in &totals.by {
            let i = col(&by.column);
            for (value, count) in &by.counts {
                let n = permits.rows.iter().filter(|r| s(&r[i]) == value).count();
                assert_eq!(n, *count, "{} = {value}", by.column);
            }
        }
        for row in &permits.rows {
            assert_eq!(row.len(), COLUMNS.len());
            assert!(is_placeholder(&permits, row));
            for c in ["department", "supervisor"] {
                assert!(ids.contains(&s(&row[col(c)])), "{:?}", row[col(c)]);
            }
        }
        // The shipped file is exactly what to_ron writes.
        assert_eq!(to_ron(&permits), PERMITS);
    }

    #[test]
    fn imports_the_sample() {
        let agencies = agencies();
        let rows = import_csv(
            "official_sample.csv",
            SAMPLE,
            &agencies,
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap();
        assert_eq!(rows.len(), 6);
        let get = |r: usize, c: &str| s(&rows[r][col(c)]).to_string();
        let expect = [
            (
                "ZZFL-C-001",
                "食品经营许可",
                "hebei.sjz.amr",
                "hebei.sjz.amr",
                "commitment",
            ),
            (
                "ZZFL-C-002",
                "公共场所卫生许可",
                "hebei.sjz.health",
                "hebei.sjz.health",
                "optimise",
            ),
            (
                "ZZFL-C-003",
                "旅行社业务经营许可",
                "hebei.sjz.culture",
                "hebei.sjz.culture",
                "optimise",
            ),
            (
                "ZZFL-C-004",
                "道路货物运输经营许可（使用总质量4.5吨及以下普通货运车辆的除外）",
                "hebei.sjz.transport",
                "hebei.sjz.transport",
                "optimise",
            ),
            (
                "ZZFL-C-005",
                "对外贸易经营者备案登记",
                "hebei.sjz.commerce",
                "hebei.sjz.commerce",
                "abolish",
            ),
            (
                "ZZFL-C-006",
                "国际货运代理企业经营资格审批",
                "hebei.sjz.approval",
                "hebei.sjz.amr",
                "filing",
            ),
        ];
        for (r, (id, name, dept, sup, way)) in expect.iter().enumerate() {
            assert_eq!(get(r, "id"), *id);
            assert_eq!(get(r, "name"), *name);
            assert_eq!(get(r, "level"), "central");
            assert_eq!(get(r, "department"), *dept, "row {r}");
            assert_eq!(get(r, "supervisor"), *sup, "row {r}");
            assert_eq!(get(r, "way"), *way, "row {r}");
        }
        assert!(get(0, "basis").contains("食品安全法"));
        assert_eq!(get(0, "department_text"), "县级市场监管部门");
        assert!(get(0, "measures").contains("告知承诺"));
        assert!(!get(0, "supervision").is_empty());

        // A BOM and an id prefix change nothing else.
        let bom = format!("\u{feff}{SAMPLE}");
        let mut options = ImportOptions::new(ImportLevel::Hebei);
        options.id_prefix = Some("HB-".into());
        let again = import_csv("official_sample.csv", &bom, &agencies, &options).unwrap();
        assert_eq!(s(&again[0][0]), "HB-001");
        assert_eq!(s(&again[0][col("level")]), "hebei");
        for (a, b) in rows.iter().zip(&again) {
            assert_eq!(a[1..3], b[1..3]);
            assert_eq!(a[4..], b[4..]);
        }
    }

    #[test]
    fn wrong_way_names_line_and_column() {
        let text = "序号,事项名称,设定依据,审批层级和部门,改革方式,具体改革举措,事中事后监管措施\n\
                    1,食品经营许可,《食品安全法》,县级市场监管部门,实行告知承诺,a,b\n\
                    2,印章刻制业特种行业许可,《国务院决定》,县级公安机关,取消,a,b\n";
        let err = import_csv(
            "permits.csv",
            text,
            &agencies(),
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "permits.csv:3: 改革方式 `取消` is not one of 直接取消审批, 审批改为备案, 实行告知承诺, 优化审批服务"
        );
        // A quoted field spanning lines still gives the line the row starts on.
        let text = "事项名称,设定依据,审批层级和部门,改革方式,具体改革举措,事中事后监管措施\n\
                    食品经营许可,\"《食品安全法》\n第三十五条\",县级市场监管部门,告知承诺,a,b\n\
                    药品零售,《药品管理法》,县级市场监管部门,,a,b\n";
        let err = import_csv(
            "permits.csv",
            text,
            &agencies(),
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "permits.csv:4: 改革方式 is empty");
    }

    #[test]
    fn missing_column_and_other_errors() {
        let options = ImportOptions::new(ImportLevel::Central);
        let agencies = agencies();
        let text =
            "序号,事项名称,设定依据,改革方式,具体改革举措,事中事后监管措施\n1,a,b,告知承诺,c,d\n";
        let err = import_csv("permits.csv", text, &agencies, &options).unwrap_err();
        assert!(matches!(
            err,
            ImportError::MissingColumn {
                column: "审批层级和部门",
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("permits.csv:1: the header has no column 审批层级和部门")
        );

        let header = "事项名称,设定依据,审批层级和部门,改革方式,具体改革举措,事中事后监管措施\n";
        let cases = [
            (
                format!("{header}a,b,c,告知承诺,d\n"),
                "permits.csv:2: the row has 5 fields but the header has 6",
            ),
            (
                format!("{header}\n,b,c,告知承诺,d,e\n"),
                "permits.csv:3: 事项名称 is empty",
            ),
            (
                format!("{header}a,b,c,告知承诺,\"d,e\n"),
                "permits.csv:2: the row has 5 fields but the header has 6",
            ),
            (
                format!("{header}a,b,c,告知承诺,d,e,f\n"),
                "permits.csv:2: the row has 7 fields but the header has 6",
            ),
            (
                format!("{header}a,b,c,告知承诺,d,e,,\n,b,c,d,e,f\n"),
                "permits.csv:3: 事项名称 is empty",
            ),
            (
                header.to_string(),
                "permits.csv:1: no item rows; importing it would erase every central row",
            ),
            (
                String::new(),
                "permits.csv:1: the header has no column 事项名称 (official columns: 事项名称, 设定依据, 审批层级和部门, 改革方式, 具体改革举措, 事中事后监管措施)",
            ),
        ];
        for (text, message) in cases {
            let err = import_csv("permits.csv", &text, &agencies, &options).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        let twice =
            "事项名称,改革事项,设定依据,审批层级和部门,改革方式,具体改革举措,事中事后监管措施\n";
        let err = import_csv("permits.csv", twice, &agencies, &options).unwrap_err();
        assert!(matches!(err, ImportError::DuplicateColumn { .. }));

        let mut bad = options.clone();
        bad.default_department = "nowhere".into();
        let err = import_csv("permits.csv", SAMPLE, &agencies, &bad).unwrap_err();
        assert!(matches!(
            err,
            ImportError::UnknownDefault {
                role: "department",
                ..
            }
        ));
    }

    #[test]
    fn way_as_four_mark_columns() {
        let text = "事项名称,设定依据,审批层级和部门,直接取消审批,审批改为备案,实行告知承诺,优化审批服务,具体改革举措,加强事中事后监管措施\n\
                    a,b,县级公安机关,,,√,,c,d\n\
                    e,f,省级生态环境部门,,,,✓,g,h\n\
                    i,j,k,√,√,,,l,m\n";
        let err = import_csv(
            "list.csv",
            text,
            &agencies(),
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "list.csv:4: 改革方式 is marked in 2 of the columns 直接取消审批, 审批改为备案, 实行告知承诺, 优化审批服务; mark exactly one"
        );
        let ok: String = text.lines().take(3).map(|l| format!("{l}\r\n")).collect();
        let rows = import_csv(
            "list.csv",
            &ok,
            &agencies(),
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap();
        assert_eq!(s(&rows[0][col("way")]), "commitment");
        assert_eq!(s(&rows[0][col("department")]), "hebei.sjz.police");
        assert_eq!(s(&rows[1][col("way")]), "optimise");
        assert_eq!(s(&rows[1][col("department")]), "hebei.sjz.ecology");
        assert_eq!(s(&rows[1][col("supervision")]), "h");
    }

    #[test]
    fn department_keywords() {
        let agencies = agencies();
        let m = Matcher::new(&agencies);
        for (text, id) in [
            ("县级以上地方人民政府民政部门", Some("hebei.sjz.civil")),
            ("省级人民政府确定的部门", None),
            ("公安机关交通管理部门", Some("hebei.sjz.police")),
            ("设区的市级交通运输主管部门", Some("hebei.sjz.transport")),
            ("市级住房城乡建设部门", Some("hebei.sjz.housing")),
            ("县级应急管理部门", Some("hebei.sjz.emergency")),
            ("海关", Some("hebei.sjz.customs")),
            ("", None),
        ] {
            assert_eq!(m.find(text), id, "{text}");
        }
    }

    #[test]
    fn way_forms() {
        for (text, way) in [
            ("直接取消审批", Some("abolish")),
            ("取消审批", Some("abolish")),
            ("审批改为备案", Some("filing")),
            (" 改为备案 ", Some("filing")),
            ("实行告知承诺", Some("commitment")),
            ("告知承诺", Some("commitment")),
            ("优化审批服务", Some("optimise")),
            ("优化服务", Some("optimise")),
            ("optimise", Some("optimise")),
            ("取消", None),
            ("备案", None),
            ("优化", None),
            ("", None),
        ] {
            assert_eq!(parse_way(text), way, "{text}");
        }
    }

    #[test]
    fn merge_and_round_trip() {
        let agencies = agencies();
        let options = ImportOptions::new(ImportLevel::Hebei);
        let sample = import_csv("official_sample.csv", SAMPLE, &agencies, &options).unwrap();

        // As many rows as placeholders: still 540, Hebei rows real, status waits for central.
        let mut catalogue = permits();
        let hebei: Vec<Vec<Value>> = (0..17).map(|i| sample[i % sample.len()].clone()).collect();
        merge(&mut catalogue, ImportLevel::Hebei, hebei.clone());
        assert_eq!(catalogue.rows.len(), 540);
        assert_eq!(catalogue.rows[523..], hebei[..]);
        assert!(is_placeholder(&catalogue, &catalogue.rows[522]));
        assert_eq!(catalogue.status, CatalogueStatus::AwaitingOfficialList);
        let text = to_ron(&catalogue);
        assert!(text.contains("AWAITING THE OFFICIAL LIST: 523 of 540 rows"));
        assert!(text.contains("食品经营许可"), "Chinese must stay readable");
        assert!(!text.contains("\\u"));
        let back: Catalogue = ron_options().from_str(&text).unwrap();
        assert_eq!(back, catalogue);
        assert_eq!(back.rows.len(), 540);
        // One row per line.
        assert_eq!(
            text.lines()
                .filter(|l| l.trim_start().starts_with("[\"ZZFL-"))
                .count(),
            540
        );

        // Central replaced by a different count: kept as imported, totals untouched.
        let central = import_csv(
            "official_sample.csv",
            SAMPLE,
            &agencies,
            &ImportOptions::new(ImportLevel::Central),
        )
        .unwrap();
        merge(&mut catalogue, ImportLevel::Central, central.clone());
        assert_eq!(catalogue.rows.len(), 6 + 17);
        assert_eq!(catalogue.rows[..6], central[..]);
        assert_eq!(catalogue.status, CatalogueStatus::Official);
        assert_eq!(catalogue.totals, permits().totals);
        let text = to_ron(&catalogue);
        assert!(!text.contains("AWAITING"));
        let back: Catalogue = ron_options().from_str(&text).unwrap();
        assert_eq!(back, catalogue);
        assert_eq!(back.rows.len(), 23);

        // Merging a level that has no rows yet: central first, Hebei last.
        let mut empty = permits();
        empty.rows.clear();
        merge(&mut empty, ImportLevel::Hebei, hebei.clone());
        merge(&mut empty, ImportLevel::Central, central.clone());
        assert_eq!(empty.rows[..6], central[..]);
        assert_eq!(empty.rows[6..], hebei[..]);
    }
}
